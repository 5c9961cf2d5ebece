//! Configuration: one TOML file, `${VAR}` expansion, errors that name the
//! file, the key and what was expected.

mod checks;
mod load;
mod model;
mod sources;

pub use load::{ConfigError, load_file, parse_text};
pub use model::{
    ApiKey, ApiKeys, AuthConfig, BusConfig, Children, CommandsConfig, Config, DeadLetterConfig,
    HistoryConfig, KafkaRecordsConfig, LoadedConfig, ProductConfig, RecordsConfig, RedisConfig,
    RedisStreamConfig, RegistryConfig, RouteConfig, ScopedKey, ScriptsConfig, ServerConfig,
    StatusConfig, WebSocketConfig, WorkersConfig, check_name,
};
pub use sources::{HttpIngestConfig, KafkaConfig, MqttConfig, MqttProtocol, SourcesConfig};
