//! Error kinds: what went wrong, as every interface reports it. A failure is classified
//! once, where it is known (a parser, the planner, a limit, the store), into an
//! [`ErrorKind`]; the HTTP status and the Postgres SQLSTATE both come from the kind, never
//! from searching an error's message.

/// What kind of failure an error is, independent of the protocol reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The statement does not parse.
    Syntax,
    /// A column it names does not exist.
    UndefinedColumn,
    /// A column name is ambiguous.
    AmbiguousColumn,
    /// A table it names does not exist.
    UndefinedTable,
    /// A function it names does not exist.
    UndefinedFunction,
    /// Another named object (a schema, a setting) does not exist.
    UndefinedObject,
    /// Types do not fit (planning failed on the statement's own terms).
    Mismatch,
    /// A value could not be computed (a cast, a division, an overflow).
    Data,
    /// A valid statement uses something this service does not support.
    Unsupported,
    /// The statement would write: the lake is read-only over SQL.
    ReadOnly,
    /// The caller's credential may not do this.
    Forbidden,
    /// The statement is too long or too deeply nested.
    TooComplex,
    /// The statement went past its memory limit.
    OutOfMemory,
    /// Too many statements run now; retry later.
    Busy,
    /// The statement ran past its time limit.
    Timeout,
    /// The client canceled the statement.
    Canceled,
    /// The lake's store or a disk failed: the service's fault, worth a retry.
    Unavailable,
    /// A bug.
    Internal,
}

impl ErrorKind {
    /// The Postgres SQLSTATE of the kind.
    pub fn sqlstate(self) -> &'static str {
        match self {
            Self::Syntax => "42601",
            Self::UndefinedColumn => "42703",
            Self::AmbiguousColumn => "42702",
            Self::UndefinedTable => "42P01",
            Self::UndefinedFunction => "42883",
            Self::UndefinedObject => "42704",
            Self::Mismatch => "42804",
            Self::Data => "22000",
            Self::Unsupported => "0A000",
            Self::ReadOnly => "25006",
            Self::Forbidden => "42501",
            Self::TooComplex => "54001",
            Self::OutOfMemory => "53200",
            Self::Busy => "53300",
            Self::Timeout | Self::Canceled => "57014",
            Self::Unavailable => "58030",
            Self::Internal => "XX000",
        }
    }

    /// The HTTP status of the kind.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Syntax
            | Self::UndefinedColumn
            | Self::AmbiguousColumn
            | Self::UndefinedTable
            | Self::UndefinedFunction
            | Self::UndefinedObject
            | Self::Mismatch
            | Self::Data
            | Self::Unsupported
            | Self::ReadOnly
            | Self::TooComplex => 400,
            Self::Forbidden => 403,
            Self::OutOfMemory => 422,
            Self::Busy => 429,
            Self::Canceled => 499,
            Self::Timeout | Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// The `status` label of the query counters.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forbidden | Self::ReadOnly => "refused",
            Self::TooComplex => "too_complex",
            Self::OutOfMemory => "memory_limit",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::Canceled => "canceled",
            _ => "error",
        }
    }

    /// Whether the caller's statement is at fault (as opposed to the service).
    pub fn is_user_error(self) -> bool {
        !matches!(self, Self::Unavailable | Self::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 18] = [
        ErrorKind::Syntax,
        ErrorKind::UndefinedColumn,
        ErrorKind::AmbiguousColumn,
        ErrorKind::UndefinedTable,
        ErrorKind::UndefinedFunction,
        ErrorKind::UndefinedObject,
        ErrorKind::Mismatch,
        ErrorKind::Data,
        ErrorKind::Unsupported,
        ErrorKind::ReadOnly,
        ErrorKind::Forbidden,
        ErrorKind::TooComplex,
        ErrorKind::OutOfMemory,
        ErrorKind::Busy,
        ErrorKind::Timeout,
        ErrorKind::Canceled,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    #[test]
    fn every_kind_has_a_five_character_sqlstate_of_its_class() {
        for kind in ALL {
            let code = kind.sqlstate();
            assert_eq!(code.len(), 5, "{kind:?}");
            let class = &code[..2];
            let expected = match kind.http_status() {
                400 if kind == ErrorKind::Data => "22",
                400 if kind == ErrorKind::Unsupported => "0A",
                400 if kind == ErrorKind::TooComplex => "54",
                400 if kind == ErrorKind::ReadOnly => "25",
                400 | 403 => "42",
                422 | 429 => "53",
                499 => "57",
                503 if kind == ErrorKind::Timeout => "57",
                503 => "58",
                500 => "XX",
                other => panic!("{kind:?}: unexpected status {other}"),
            };
            assert_eq!(class, expected, "{kind:?}");
        }
    }

    #[test]
    fn only_the_service_s_failures_are_not_the_user_s() {
        let service: Vec<_> = ALL.into_iter().filter(|k| !k.is_user_error()).collect();
        assert_eq!(service, [ErrorKind::Unavailable, ErrorKind::Internal]);
        for kind in service {
            assert!(kind.http_status() >= 500);
        }
    }
}
