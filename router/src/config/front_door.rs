//! `front_door:` in the YAML config: how long and how many client connections the router tolerates.
//!
//! ```yaml
//! front_door: {header_read_timeout: 10s, body_read_timeout: 30s, max_connections: 65536, max_messages: 2048}
//! ```

use std::time::Duration;

use serde::Deserialize;

use super::{dur, invalid};
use crate::Error;

/// `front_door:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrontDoor {
    /// A client must have sent a whole request head this long after connecting or after its previous response
    /// (so it is also the keep-alive idle timeout); default 10s.
    pub header_read_timeout: Option<String>,
    /// A client must have sent its whole request body this long after its head; default 30s.
    pub body_read_timeout: Option<String>,
    /// Client connections open at once; more wait in the listen backlog (default 65536).
    pub max_connections: Option<usize>,
    /// Messages a chat request may carry; more are refused with 400 before any rendering or tokenizing (default
    /// 2048).
    pub max_messages: Option<usize>,
}

/// Validated front-door limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrontDoorConfig {
    /// Connect (or previous response) to complete request head; then hyper closes the connection.
    pub header_read_timeout: Duration,
    /// Request head to complete request body; then 408.
    pub body_read_timeout: Duration,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Messages per chat request.
    pub max_messages: usize,
}

impl Default for FrontDoorConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            max_messages: 2048,
        }
    }
}

impl RawFrontDoor {
    /// Validates: timeouts above zero, at least one connection.
    pub fn validate(self) -> Result<FrontDoorConfig, Error> {
        let d = FrontDoorConfig::default();
        let header_read_timeout = dur(
            "front_door.header_read_timeout",
            &self.header_read_timeout,
            d.header_read_timeout,
        )?;
        if header_read_timeout.is_zero() {
            return Err(invalid("front_door.header_read_timeout", "must be > 0"));
        }
        let body_read_timeout = dur(
            "front_door.body_read_timeout",
            &self.body_read_timeout,
            d.body_read_timeout,
        )?;
        if body_read_timeout.is_zero() {
            return Err(invalid("front_door.body_read_timeout", "must be > 0"));
        }
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 || max_connections > 1 << 24 {
            return Err(invalid(
                "front_door.max_connections",
                "must be in 1..=16777216",
            ));
        }
        let max_messages = self.max_messages.unwrap_or(d.max_messages);
        if max_messages == 0 {
            return Err(invalid("front_door.max_messages", "must be >= 1"));
        }
        Ok(FrontDoorConfig {
            header_read_timeout,
            body_read_timeout,
            max_connections,
            max_messages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    #[test]
    fn front_door_defaults_and_overrides() {
        let c = RawConfig::default().validate().unwrap();
        assert_eq!(c.front_door, FrontDoorConfig::default());
        let c = RawConfig::from_yaml(
            "front_door: {header_read_timeout: 500ms, body_read_timeout: 2s, max_connections: 8, max_messages: 3}",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(
            c.front_door,
            FrontDoorConfig {
                header_read_timeout: Duration::from_millis(500),
                body_read_timeout: Duration::from_secs(2),
                max_connections: 8,
                max_messages: 3,
            }
        );
    }

    #[test]
    fn front_door_rejects_zero_values_naming_the_field() {
        for (yaml, field) in [
            (
                "front_door: {max_connections: 0}",
                "front_door.max_connections",
            ),
            (
                "front_door: {header_read_timeout: 0s}",
                "front_door.header_read_timeout",
            ),
            (
                "front_door: {body_read_timeout: 0ms}",
                "front_door.body_read_timeout",
            ),
            ("front_door: {max_messages: 0}", "front_door.max_messages"),
            ("front_door: {idle: 1s}", "idle"),
        ] {
            let e = RawConfig::from_yaml(yaml)
                .and_then(RawConfig::validate)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
}
