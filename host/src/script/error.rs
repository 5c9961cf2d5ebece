//! Every way running a script can fail, each naming the product and script version.

use std::fmt;
use std::time::Duration;

/// A product's script at one version: the content hash of its `.wasm` file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScriptId {
    /// The product the script belongs to.
    pub product: String,
    /// The first 12 hex digits of the SHA-256 of the script file.
    pub version: String,
}

impl fmt::Display for ScriptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.product, self.version)
    }
}

/// Why a script could not be loaded or could not parse a message.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The script file could not be read.
    #[error("script for product {product:?}: cannot read {path}: {source}")]
    Read {
        /// The product whose script it is.
        product: String,
        /// The file that could not be read.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not a valid WebAssembly component.
    #[error("script {script}: does not compile: {reason}")]
    Compile {
        /// Which script.
        script: ScriptId,
        /// What the compiler said.
        reason: String,
    },
    /// The component does not fit the `sluice:script/script` world (a
    /// missing export, a wrong signature, an import sluice does not offer).
    #[error("script {script}: does not fit the sluice:script world: {reason}")]
    Link {
        /// Which script.
        script: ScriptId,
        /// What did not match.
        reason: String,
    },
    /// Creating an instance failed (for example its initial memory is over the limit).
    #[error("script {script}: cannot start an instance: {reason}")]
    Instantiate {
        /// Which script.
        script: ScriptId,
        /// Why.
        reason: String,
    },
    /// The script ran longer than its per-call deadline.
    #[error("script {script}: stopped after exceeding its time limit of {limit:?} per call")]
    Timeout {
        /// Which script.
        script: ScriptId,
        /// The deadline it exceeded.
        limit: Duration,
    },
    /// The script tried to grow its linear memory past the cap.
    #[error(
        "script {script}: stopped for exceeding its memory limit: it has {current} bytes, asked for {requested}, the limit is {limit}"
    )]
    MemoryExceeded {
        /// Which script.
        script: ScriptId,
        /// Bytes of linear memory it had.
        current: usize,
        /// Bytes it asked to grow to.
        requested: usize,
        /// The configured cap in bytes.
        limit: usize,
    },
    /// The script trapped: a panic, an out-of-bounds access, a stack overflow.
    #[error("script {script}: trapped: {trap}{}", panic.as_deref().map(|p| format!(" ({p})")).unwrap_or_default())]
    Trap {
        /// Which script.
        script: ScriptId,
        /// What wasmtime reported, such as "wasm `unreachable` instruction executed".
        trap: String,
        /// The last error the script logged before trapping (a Rust
        /// script's panic message arrives this way).
        panic: Option<String>,
        /// The innermost guest frames, innermost first.
        backtrace: String,
    },
    /// The outputs of one call are larger than the cap.
    #[error(
        "script {script}: output too large: {size} bytes in {count} outputs, the limit is {limit} bytes and {max_count} outputs"
    )]
    OutputTooLarge {
        /// Which script.
        script: ScriptId,
        /// Approximate size of the outputs in bytes.
        size: usize,
        /// Number of outputs.
        count: usize,
        /// The size cap in bytes.
        limit: usize,
        /// The cap on the number of outputs.
        max_count: usize,
    },
    /// An output breaks the contract (an empty key, invalid nested JSON, a NaN).
    #[error("script {script}: bad output #{index}: {reason}")]
    BadOutput {
        /// Which script.
        script: ScriptId,
        /// Index of the offending output in the list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An output's timestamp lies outside the product's window around the
    /// message's receive time.
    #[error(
        "script {script}: output #{index} has timestamp {timestamp} (ms since the Unix epoch), outside the window of {past} before to {future} after the receive time {received_at}"
    )]
    BadTimestamp {
        /// Which script.
        script: ScriptId,
        /// Index of the offending output.
        index: usize,
        /// Its timestamp.
        timestamp: i64,
        /// The message's receive time.
        received_at: i64,
        /// How far back the window reaches, for people.
        past: String,
        /// How far ahead it reaches, for people.
        future: String,
    },
    /// The script does not encode commands (no `encode`, or one answering
    /// `not-supported`).
    #[error("script {script}: does not accept commands (it does not encode them)")]
    NotSupported {
        /// Which script.
        script: ScriptId,
    },
    /// The script refused the message with its own error.
    #[error("script {script}: rejected the message: {code}: {message}")]
    Rejected {
        /// Which script.
        script: ScriptId,
        /// The script's stable error code.
        code: String,
        /// The script's explanation.
        message: String,
    },
}

impl ScriptError {
    /// A stable, short name of the kind of failure, for metrics and dead letters.
    pub fn kind(&self) -> &'static str {
        match self {
            ScriptError::Read { .. } => "read",
            ScriptError::Compile { .. } => "compile",
            ScriptError::Link { .. } => "link",
            ScriptError::Instantiate { .. } => "instantiate",
            ScriptError::Timeout { .. } => "timeout",
            ScriptError::MemoryExceeded { .. } => "memory",
            ScriptError::Trap { .. } => "trap",
            ScriptError::OutputTooLarge { .. } => "output_too_large",
            ScriptError::BadOutput { .. } => "bad_output",
            ScriptError::BadTimestamp { .. } => "bad_timestamp",
            ScriptError::NotSupported { .. } => "not_supported",
            ScriptError::Rejected { .. } => "rejected",
        }
    }

    /// Whether the instance that produced this error is unusable and must be
    /// replaced before the next call.
    pub fn discards_instance(&self) -> bool {
        matches!(
            self,
            ScriptError::Timeout { .. }
                | ScriptError::MemoryExceeded { .. }
                | ScriptError::Trap { .. }
        )
    }
}
