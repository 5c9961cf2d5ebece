//! Routing: which product and device a message belongs to, from MQTT topic
//! templates such as `devices/{product}/{device}/telemetry`, and explicit
//! status signals from the status topic.

use crate::config::{RouteConfig, check_name};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Product,
    Device,
}

/// One MQTT topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
    product: Option<String>,
}

impl TopicTemplate {
    /// Parses a data template: it names `{device}`, and `{product}` unless
    /// a fixed `product` is given.
    pub fn parse(topic: &str, product: Option<&str>) -> Result<Self, String> {
        let template = Self::parse_segments(topic)?;
        let names_product = template.segments.contains(&Segment::Product);
        match (names_product, product) {
            (true, Some(_)) => {
                return Err("the topic names {product} and a product is also given".into());
            }
            (false, None) => return Err("expected {product} in the topic, or a `product`".into()),
            (_, Some(product)) => check_name(product)?,
            (true, None) => {}
        }
        Ok(TopicTemplate {
            product: product.map(str::to_owned),
            ..template
        })
    }

    /// Parses the status template: it names `{device}` only.
    pub fn parse_status(topic: &str) -> Result<Self, String> {
        let template = Self::parse_segments(topic)?;
        if template.segments.contains(&Segment::Product) {
            return Err("the status topic names {device} only".into());
        }
        Ok(template)
    }

    fn parse_segments(topic: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        for part in topic.split('/') {
            segments.push(match part {
                "{product}" if segments.contains(&Segment::Product) => {
                    return Err("{product} appears twice".into());
                }
                "{device}" if segments.contains(&Segment::Device) => {
                    return Err("{device} appears twice".into());
                }
                "{product}" => Segment::Product,
                "{device}" => Segment::Device,
                "+" => Segment::Any,
                "#" => return Err("'#' is not allowed in a template; use '+' per level".into()),
                literal if literal.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "segment {literal:?}: expected a literal, '+', {{product}} or {{device}}"
                    ));
                }
                literal => Segment::Literal(literal.to_owned()),
            });
        }
        if !segments.contains(&Segment::Device) {
            return Err("expected {device} in the topic".into());
        }
        Ok(TopicTemplate {
            segments,
            product: None,
        })
    }

    /// The MQTT subscription filter: every placeholder becomes `+`.
    pub fn filter(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                _ => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The product and device a topic names, if it fits the template.
    pub fn capture<'t>(&'t self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let mut product = self.product.as_deref();
        let mut device = None;
        let mut parts = topic.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(l) if l != part => return None,
                Segment::Literal(_) | Segment::Any => {}
                Segment::Product => product = Some(part),
                Segment::Device => device = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        let (product, device) = (product.unwrap_or(""), device?);
        let named_product_ok =
            !self.segments.contains(&Segment::Product) || check_name(product).is_ok();
        (check_name(device).is_ok() && named_product_ok).then_some((product, device))
    }
}

/// Where a topic leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'t> {
    /// A data message for a product's script.
    Data {
        /// The product.
        product: &'t str,
        /// The device.
        device: &'t str,
    },
    /// An explicit online/offline signal.
    Status {
        /// The device.
        device: &'t str,
        /// Online or offline.
        online: bool,
    },
    /// Nothing fits; the reason says why.
    Unroutable(String),
}

/// The route table of MQTT topics.
#[derive(Debug, Clone, Default)]
pub struct Router {
    data: Vec<TopicTemplate>,
    status: Option<TopicTemplate>,
}

impl Router {
    /// Builds the table from checked configuration.
    pub fn new(routes: &[RouteConfig], status_topic: Option<&str>) -> Result<Self, String> {
        let data = routes
            .iter()
            .map(|r| TopicTemplate::parse(&r.topic, r.product.as_deref()))
            .collect::<Result<_, _>>()?;
        let status = status_topic.map(TopicTemplate::parse_status).transpose()?;
        Ok(Router { data, status })
    }

    /// Every subscription filter the routes need.
    pub fn filters(&self) -> Vec<String> {
        let mut filters: Vec<String> = self
            .status
            .iter()
            .chain(&self.data)
            .map(TopicTemplate::filter)
            .collect();
        filters.dedup();
        filters
    }

    /// Routes one MQTT message. The status topic is tried first.
    pub fn route<'t>(&'t self, topic: &'t str, payload: &[u8]) -> Route<'t> {
        if let Some((_, device)) = self.status.as_ref().and_then(|s| s.capture(topic)) {
            return match parse_status_payload(payload) {
                Some(online) => Route::Status { device, online },
                None => Route::Unroutable(format!(
                    "status payload {:?} is not 1 or 0",
                    String::from_utf8_lossy(&payload[..payload.len().min(32)])
                )),
            };
        }
        for template in &self.data {
            if let Some((product, device)) = template.capture(topic) {
                return Route::Data { product, device };
            }
        }
        Route::Unroutable(format!("topic {topic:?} matches no route"))
    }
}

/// `1`/`0` (also `true`/`false`, `online`/`offline`), surrounding space ignored.
pub fn parse_status_payload(payload: &[u8]) -> Option<bool> {
    match std::str::from_utf8(payload).ok()?.trim() {
        "1" | "true" | "online" => Some(true),
        "0" | "false" | "offline" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(
            &[
                RouteConfig {
                    topic: "devices/{product}/{device}/telemetry".into(),
                    product: None,
                },
                RouteConfig {
                    topic: "application/+/device/{device}/event/up".into(),
                    product: Some("lht65".into()),
                },
            ],
            Some("devices/status/{device}"),
        )
        .unwrap()
    }

    #[test]
    fn templates_capture_product_and_device() {
        let r = router();
        assert_eq!(
            r.route("devices/json-sensor/th-1/telemetry", b"{}"),
            Route::Data {
                product: "json-sensor",
                device: "th-1"
            }
        );
        assert_eq!(
            r.route("application/7/device/a840/event/up", b"{}"),
            Route::Data {
                product: "lht65",
                device: "a840"
            }
        );
        assert!(matches!(
            r.route("devices/json-sensor/th-1", b""),
            Route::Unroutable(_)
        ));
        assert!(matches!(
            r.route("devices/json-sensor/th-1/telemetry/extra", b""),
            Route::Unroutable(_)
        ));
        assert!(
            matches!(
                r.route("devices//th-1/telemetry", b""),
                Route::Unroutable(_)
            ),
            "empty product"
        );
    }

    #[test]
    fn the_status_topic_carries_one_or_zero() {
        let r = router();
        assert_eq!(
            r.route("devices/status/th-1", b"1"),
            Route::Status {
                device: "th-1",
                online: true
            }
        );
        assert_eq!(
            r.route("devices/status/th-1", b" 0\n"),
            Route::Status {
                device: "th-1",
                online: false
            }
        );
        match r.route("devices/status/th-1", b"maybe") {
            Route::Unroutable(reason) => assert!(reason.contains("not 1 or 0"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn filters_cover_every_route() {
        assert_eq!(
            router().filters(),
            [
                "devices/status/+",
                "devices/+/+/telemetry",
                "application/+/device/+/event/up"
            ]
        );
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        assert!(
            TopicTemplate::parse("devices/{device}", None)
                .unwrap_err()
                .contains("{product}")
        );
        assert!(
            TopicTemplate::parse("devices/{product}", None)
                .unwrap_err()
                .contains("{device}")
        );
        assert!(
            TopicTemplate::parse("devices/#", Some("p"))
                .unwrap_err()
                .contains("'#'")
        );
        assert!(
            TopicTemplate::parse("d/{product}/{device}", Some("p"))
                .unwrap_err()
                .contains("also given")
        );
        assert!(
            TopicTemplate::parse("d/x{device}", Some("p"))
                .unwrap_err()
                .contains("expected a literal")
        );
        assert!(TopicTemplate::parse_status("s/{product}/{device}").is_err());
    }
}
