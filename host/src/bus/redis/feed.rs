//! The transitions feed: every status change any instance recorded, read
//! from `sluice:status:transitions` in order, so each instance's tracker
//! follows the shared status table. A stream (not a channel) lets a
//! reader that lost its connection continue where it stopped.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

use super::bus::TRANSITIONS_KEY;
use crate::bus::{BusError, StatusChange};

/// Entries read per round trip, at most.
const READ_COUNT: usize = 1000;

/// A status change as the feed carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Followed {
    /// The change.
    pub change: StatusChange,
    /// For an expiry: the deadline that passed (ms since the Unix epoch).
    pub deadline_ms: Option<i64>,
}

/// A reader of the transitions stream.
pub struct TransitionFeed {
    connection: MultiplexedConnection,
    last_id: String,
    block: Duration,
}

impl std::fmt::Debug for TransitionFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitionFeed")
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

fn unavailable(error: redis::RedisError) -> BusError {
    BusError::Unavailable(error.to_string())
}

impl TransitionFeed {
    /// A reader positioned after the newest entry: what is recorded from
    /// now on. Each read waits up to `block` for new entries.
    pub async fn open(client: &Client, block: Duration) -> Result<Self, BusError> {
        // Its own connection: a blocking read would hold up the commands
        // queued behind it on a shared one.
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(unavailable)?;
        let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(TRANSITIONS_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let last_id = newest
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id);
        Ok(TransitionFeed {
            connection,
            last_id,
            block,
        })
    }

    /// The next entries, waiting up to the block time for some.
    pub async fn next(&mut self) -> Result<Vec<Followed>, BusError> {
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let block_ms = u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX);
        let reply: Option<Vec<(String, Entries)>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(TRANSITIONS_KEY)
            .arg(&self.last_id)
            .query_async(&mut self.connection)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for (_, entries) in reply.unwrap_or_default() {
            for (id, fields) in entries {
                self.last_id = id;
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                let Some(json) = field("change") else {
                    continue;
                };
                match serde_json::from_str::<StatusChange>(json) {
                    Ok(change) => out.push(Followed {
                        change,
                        deadline_ms: field("deadline")
                            .and_then(|d| d.parse::<f64>().ok())
                            .map(|d| d as i64),
                    }),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a transition that does not parse");
                    }
                }
            }
        }
        Ok(out)
    }
}
