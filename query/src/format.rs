//! Result formats shared by the HTTP API and the command line.

use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// An aligned text table, for people.
    #[default]
    Table,
    /// CSV with a header row; maps and lists as JSON text.
    Csv,
    /// A JSON array of row objects.
    Json,
    /// An Arrow IPC stream.
    Arrow,
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Ok(Self::Table),
            "csv" => Ok(Self::Csv),
            "json" => Ok(Self::Json),
            "arrow" => Ok(Self::Arrow),
            other => Err(format!(
                "unknown format {other:?}: expected table, csv, json or arrow"
            )),
        }
    }
}

impl OutputFormat {
    /// The HTTP content type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Table => "text/plain; charset=utf-8",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Json => "application/json",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Writes `batches` (all of `schema`) in `format`.
pub fn render(
    format: OutputFormat,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches_with_schema(
                Arc::clone(schema),
                batches,
            )?;
            out.extend_from_slice(table.to_string().as_bytes());
            out.push(b'\n');
        }
        OutputFormat::Csv => {
            let flat = flat_schema(schema);
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.is_empty() {
                writer.write(&RecordBatch::new_empty(Arc::clone(&flat)))?;
            }
            for batch in batches {
                writer.write(&flatten_nested(batch, &flat)?)?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        OutputFormat::Arrow => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(out)
}

fn is_nested(dt: &DataType) -> bool {
    dt.is_nested()
}

/// The schema with nested columns (maps, lists, structs) turned into strings.
fn flat_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if is_nested(f.data_type()) {
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

/// Nested columns as JSON text (`{"FunctionName":"api"}`), for CSV.
fn flatten_nested(batch: &RecordBatch, flat: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let columns = batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .map(|(column, field)| {
            if is_nested(field.data_type()) {
                nested_as_json(field, column)
            } else {
                Ok(Arc::clone(column))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(flat), columns)
}

pub(crate) fn nested_as_json(field: &Field, column: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let single = Arc::new(Schema::new(vec![
        field.clone().with_name("v").with_nullable(true),
    ]));
    let batch = RecordBatch::try_new(single, vec![Arc::clone(column)])?;
    let mut buf = Vec::new();
    let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    let mut values = Vec::with_capacity(column.len());
    for (row, line) in buf.split(|b| *b == b'\n').take(column.len()).enumerate() {
        if column.is_null(row) {
            values.push(None);
            continue;
        }
        let object: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| ArrowError::JsonError(e.to_string()))?;
        values.push(object.get("v").map(|v| v.to_string()));
    }
    Ok(Arc::new(StringArray::from(values)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlake_ingest::metric_stream::MetricsBatchBuilder;

    fn sample() -> RecordBatch {
        let mut b = MetricsBatchBuilder::new();
        let line = r#"{"account_id":"111122223333","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{"FunctionName":"api"},"timestamp":1700000040000,"value":{"count":2,"sum":3,"min":1,"max":2,"p99":2}}"#;
        assert!(b.push_record(line.as_bytes()).is_empty());
        b.finish()
    }

    #[test]
    fn csv_has_a_header_and_maps_as_json() {
        let batch = sample();
        let out = render(OutputFormat::Csv, &batch.schema(), &[batch]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("time,account_id,region,namespace")
        );
        let row = lines.next().unwrap();
        assert!(row.contains(r#""{""FunctionName"":""api""}""#), "{row}");
        assert!(row.starts_with("2023-11-14T22:14:00"), "{row}");
    }

    #[test]
    fn json_is_an_array_of_objects_even_when_empty() {
        let batch = sample();
        let out = render(
            OutputFormat::Json,
            &batch.schema(),
            std::slice::from_ref(&batch),
        )
        .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(rows[0]["dimensions"]["FunctionName"], "api");
        assert_eq!(rows[0]["sum"], 3.0);
        let out = render(OutputFormat::Json, &batch.schema(), &[]).unwrap();
        assert_eq!(out, b"[]");
    }

    #[test]
    fn table_shows_headers_without_rows() {
        let batch = sample();
        let out = render(OutputFormat::Table, &batch.schema(), &[]).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("| time"));
    }
}
