//! Shard leases in a DynamoDB table, as the KCL keeps them, so that several fleetlake
//! instances consume one stream together (`formats.md` §6).
//!
//! One item per shard (`leaseKey` = `<stream>/<shard id>`) with `leaseOwner` and
//! `leaseCounter`; every change is a conditional write on the counter, so two instances
//! never both win a lease. An owner renews its leases (counter + 1) every third of the
//! lease duration; a lease whose counter has not moved for a whole duration is expired
//! and may be taken. Each instance also keeps a heartbeat item (`instance/<owner>`),
//! so that every instance knows how many are alive and takes only its share of the
//! shards. Positions are not kept here: they are committed in the lake with the rows.
//!
//! Fencing: an instance that finds a lease taken from it (it failed to renew in time)
//! must not commit what it buffered for that shard, since the new owner reads it again
//! from the committed position; the consumer reports [`LeaseLost`] and the service
//! exits without a final flush (acknowledged Firehose data is in its write-ahead log).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use futures::future::BoxFuture;

use crate::kinesis::ApiError;

/// A lease as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `<stream>/<shard id>`, or `instance/<owner>` for a heartbeat.
    pub key: String,
    /// The instance holding it (`None` when released).
    pub owner: Option<String>,
    /// Bumped by every take and renewal.
    pub counter: i64,
}

/// The lease table's operations; [`DynamoLeases`] is DynamoDB.
pub trait LeaseStore: Send + Sync + 'static {
    /// Creates the table if it does not exist and waits until it can be used.
    fn ensure_table(&self) -> BoxFuture<'_, Result<(), ApiError>>;

    /// Every lease (a consistent scan).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, ApiError>>;

    /// Takes `key` for `owner` if its counter is still `seen` (`None`: the lease does
    /// not exist yet). The new counter, or `None` if someone else changed it first.
    fn take<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        seen: Option<i64>,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>>;

    /// Renews `key` if `owner` still holds it at `counter`. The new counter, or `None`
    /// if the lease was taken away.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>>;

    /// Gives `key` up (no owner, counter + 1) if `owner` still holds it at `counter`;
    /// whether it did.
    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<bool, ApiError>>;
}

/// A lease this instance held was taken by another: see the module docs.
#[derive(Debug, Clone, thiserror::Error)]
#[error("lease {key} was taken by another instance (it was not renewed in time)")]
pub struct LeaseLost {
    /// The lease.
    pub key: String,
}

/// How a consumer takes part in a lease table.
#[derive(Clone)]
pub struct LeaseSettings {
    /// The table.
    pub store: std::sync::Arc<dyn LeaseStore>,
    /// This instance's name in `leaseOwner` (unique per running instance).
    pub owner: String,
    /// A lease not renewed for this long may be taken by another instance.
    pub duration: Duration,
}

impl std::fmt::Debug for LeaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSettings")
            .field("owner", &self.owner)
            .field("duration", &self.duration)
            .finish()
    }
}

/// Key of an instance's heartbeat item.
pub fn heartbeat_key(owner: &str) -> String {
    format!("instance/{owner}")
}

/// Tracks when each lease's counter last moved, to tell live leases from expired ones.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    seen: HashMap<String, (i64, std::time::Instant)>,
}

impl LeaseWatch {
    /// Records a listing made at `now`.
    pub fn observe(&mut self, leases: &[Lease], now: std::time::Instant) {
        for lease in leases {
            match self.seen.get(&lease.key) {
                Some((counter, _)) if *counter == lease.counter => {}
                _ => {
                    self.seen.insert(lease.key.clone(), (lease.counter, now));
                }
            }
        }
    }

    /// Whether `lease` has an owner that renewed it within `duration` of `now`.
    pub fn is_live(&self, lease: &Lease, duration: Duration, now: std::time::Instant) -> bool {
        lease.owner.is_some()
            && self
                .seen
                .get(&lease.key)
                .is_some_and(|(_, since)| now.duration_since(*since) < duration)
    }
}

/// [`LeaseStore`] over a DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoLeases {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoLeases {
    /// Leases in `table`, through `client`.
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str) -> Self {
        Self {
            client,
            table: table.to_string(),
        }
    }
}

fn dynamo_error<E, R>(e: aws_sdk_dynamodb::error::SdkError<E, R>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    crate::kinesis::sdk_error(
        e,
        &[
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
        ],
    )
}

fn is_condition_failure<E: ProvideErrorMetadata, R>(
    e: &aws_sdk_dynamodb::error::SdkError<E, R>,
) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

fn counter_of(attributes: Option<&HashMap<String, AttributeValue>>) -> Option<i64> {
    attributes?.get("leaseCounter")?.as_n().ok()?.parse().ok()
}

impl LeaseStore for DynamoLeases {
    fn ensure_table(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            let exists = match self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
            {
                Ok(_) => true,
                Err(e) if e.code() == Some("ResourceNotFoundException") => false,
                Err(e) => return Err(dynamo_error(e)),
            };
            if !exists {
                fn key<T>(
                    build: Result<T, aws_sdk_dynamodb::error::BuildError>,
                ) -> Result<T, ApiError> {
                    build.map_err(|e| ApiError::Other(e.to_string()))
                }
                let created = self
                    .client
                    .create_table()
                    .table_name(&self.table)
                    .attribute_definitions(key(AttributeDefinition::builder()
                        .attribute_name("leaseKey")
                        .attribute_type(ScalarAttributeType::S)
                        .build())?)
                    .key_schema(key(KeySchemaElement::builder()
                        .attribute_name("leaseKey")
                        .key_type(KeyType::Hash)
                        .build())?)
                    .billing_mode(BillingMode::PayPerRequest)
                    .send()
                    .await;
                match created {
                    Ok(_) => {}
                    // Another instance created it at the same time.
                    Err(e) if e.code() == Some("ResourceInUseException") => {}
                    Err(e) => return Err(dynamo_error(e)),
                }
            }
            for _ in 0..120 {
                let described = self
                    .client
                    .describe_table()
                    .table_name(&self.table)
                    .send()
                    .await
                    .map_err(dynamo_error)?;
                if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(ApiError::Other(format!(
                "lease table {} did not become active",
                self.table
            )))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Lease>, ApiError>> {
        Box::pin(async move {
            let mut leases = Vec::new();
            let mut start = None;
            loop {
                let page = self
                    .client
                    .scan()
                    .table_name(&self.table)
                    .consistent_read(true)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(dynamo_error)?;
                for item in page.items() {
                    let Some(key) = item.get("leaseKey").and_then(|v| v.as_s().ok()) else {
                        continue;
                    };
                    leases.push(Lease {
                        key: key.clone(),
                        owner: item
                            .get("leaseOwner")
                            .and_then(|v| v.as_s().ok())
                            .filter(|o| !o.is_empty())
                            .cloned(),
                        counter: counter_of(Some(item)).unwrap_or_default(),
                    });
                }
                match page.last_evaluated_key() {
                    Some(key) if !key.is_empty() => start = Some(key.clone()),
                    _ => return Ok(leases),
                }
            }
        })
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        seen: Option<i64>,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>> {
        Box::pin(async move {
            let mut request = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("leaseKey", AttributeValue::S(key.to_string()))
                .update_expression(
                    "SET leaseOwner = :owner, leaseCounter = if_not_exists(leaseCounter, :zero) + :one",
                )
                .expression_attribute_values(":owner", AttributeValue::S(owner.to_string()))
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .return_values(ReturnValue::UpdatedNew);
            request = match seen {
                None => request.condition_expression("attribute_not_exists(leaseKey)"),
                Some(counter) => request
                    .condition_expression("leaseCounter = :seen")
                    .expression_attribute_values(":seen", AttributeValue::N(counter.to_string())),
            };
            match request.send().await {
                Ok(out) => Ok(counter_of(out.attributes())),
                Err(e) if is_condition_failure(&e) => Ok(None),
                Err(e) => Err(dynamo_error(e)),
            }
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>> {
        Box::pin(async move {
            let updated = self
                .update_held(
                    key,
                    owner,
                    counter,
                    "SET leaseCounter = leaseCounter + :one",
                )
                .await?;
            Ok(updated.and_then(|attributes| counter_of(Some(&attributes))))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(async move {
            let update = "REMOVE leaseOwner SET leaseCounter = leaseCounter + :one";
            Ok(self
                .update_held(key, owner, counter, update)
                .await?
                .is_some())
        })
    }
}

impl DynamoLeases {
    /// Applies `update` to `key` if `owner` holds it at `counter`; the attributes it
    /// set, or `None` if the lease changed hands first.
    async fn update_held(
        &self,
        key: &str,
        owner: &str,
        counter: i64,
        update: &str,
    ) -> Result<Option<HashMap<String, AttributeValue>>, ApiError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", AttributeValue::S(key.to_string()))
            .update_expression(update)
            .condition_expression("leaseOwner = :owner AND leaseCounter = :seen")
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_string()))
            .expression_attribute_values(":seen", AttributeValue::N(counter.to_string()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match out {
            Ok(out) => Ok(Some(out.attributes().cloned().unwrap_or_default())),
            Err(e) if is_condition_failure(&e) => Ok(None),
            Err(e) => Err(dynamo_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_lease_is_live_while_its_counter_moves() {
        let lease = |counter| Lease {
            key: "s/shard-1".into(),
            owner: Some("a".into()),
            counter,
        };
        let mut watch = LeaseWatch::default();
        let t0 = Instant::now();
        let d = Duration::from_secs(10);
        watch.observe(&[lease(1)], t0);
        assert!(watch.is_live(&lease(1), d, t0 + Duration::from_secs(9)));
        assert!(!watch.is_live(&lease(1), d, t0 + Duration::from_secs(10)));
        watch.observe(&[lease(2)], t0 + Duration::from_secs(9));
        assert!(watch.is_live(&lease(2), d, t0 + Duration::from_secs(18)));
        let released = Lease {
            owner: None,
            ..lease(2)
        };
        assert!(!watch.is_live(&released, d, t0 + Duration::from_secs(9)));
    }
}
