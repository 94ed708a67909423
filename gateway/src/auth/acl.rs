//! Publish ACLs: MQTT topic filters (`+`, `#`) whose levels may hold templates — `{device_id}`,
//! `{client_id}`, `{username}` — filled with the connection's authenticated identity. A
//! filled-in value is compared as plain text with one topic level: it never acts as a wildcard
//! and never spans levels, so an identity such as `#`, `+` or `a/b` cannot widen a rule (and
//! such identities are refused at login anyway). Anything no rule allows is denied.

use std::fmt;

/// One parsed `publish` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    text: String,
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// `+`: any one level.
    Any,
    /// `#` (last): this level and every one below, or none.
    Rest,
    /// Text and templates, matched exactly against one level.
    Exact(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Identity,
}

impl fmt::Display for TopicRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TopicRule {
    /// Parses a topic filter with templates; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("an empty topic filter".into());
        }
        if text.contains('\0') {
            return Err("a topic filter cannot contain NUL".into());
        }
        let count = text.split('/').count();
        let mut levels = Vec::with_capacity(count);
        for (i, level) in text.split('/').enumerate() {
            levels.push(match level {
                "+" => Level::Any,
                "#" if i + 1 == count => Level::Rest,
                "#" => return Err("'#' must be the last level".into()),
                _ => Level::Exact(parse_level(level)?),
            });
        }
        Ok(Self { text: text.to_owned(), levels })
    }

    /// Whether `topic` matches for a connection whose identity is `identity` (`None`: an
    /// anonymous connection, which matches no rule with a template).
    pub fn allows(&self, topic: &str, identity: Option<&str>) -> bool {
        // [MQTT-4.7.2-1]: wildcards at the first level do not match topics starting with '$'.
        let system = topic.starts_with('$');
        let mut topic_levels = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            match level {
                Level::Rest => return !(system && i == 0),
                Level::Any => match topic_levels.next() {
                    Some(_) if system && i == 0 => return false,
                    Some(_) => {}
                    None => return false,
                },
                Level::Exact(parts) => match topic_levels.next() {
                    Some(got) if level_matches(got, parts, identity) => {}
                    _ => return false,
                },
            }
        }
        topic_levels.next().is_none()
    }
}

fn parse_level(level: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = level;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest.find('}').ok_or_else(|| format!("unclosed '{{' in {level:?}"))?;
                match &rest[1..end] {
                    "device_id" | "client_id" | "username" => parts.push(Part::Identity),
                    other => {
                        return Err(format!(
                            "unknown template {{{other}}}: use {{device_id}}, {{client_id}} or {{username}}"
                        ))
                    }
                }
                rest = &rest[end + 1..];
            }
            found => {
                let end = found.unwrap_or(rest.len());
                let text = &rest[..end];
                if text.contains(['+', '#', '}']) {
                    return Err(format!(
                        "{level:?}: '+' and '#' must be a whole level, and '}}' closes a template"
                    ));
                }
                parts.push(Part::Text(text.to_owned()));
                rest = &rest[end..];
            }
        }
    }
    Ok(parts)
}

/// Whether one topic level is exactly the parts, templates filled with `identity` as text.
fn level_matches(mut got: &str, parts: &[Part], identity: Option<&str>) -> bool {
    for part in parts {
        let expected = match part {
            Part::Text(text) => text.as_str(),
            Part::Identity => match identity {
                // An empty or level-spanning value can never stand for one level.
                Some(id) if !id.is_empty() && !id.contains('/') => id,
                _ => return false,
            },
        };
        match got.strip_prefix(expected) {
            Some(rest) => got = rest,
            None => return false,
        }
    }
    got.is_empty()
}

/// A listener's publish rules. Enforced once the listener authenticates devices (or has rules):
/// then a topic no rule allows is denied.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<TopicRule>,
}

impl Acl {
    pub fn new(rules: Vec<TopicRule>) -> Self {
        Self { rules }
    }

    pub fn allows_publish(&self, topic: &str, identity: Option<&str>) -> bool {
        self.rules.iter().any(|rule| rule.allows(topic, identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rule: &str, topic: &str, identity: Option<&str>) -> bool {
        TopicRule::parse(rule).unwrap().allows(topic, identity)
    }

    #[test]
    fn wildcards_match_as_in_mqtt() {
        assert!(allows("a/+/c", "a/b/c", None));
        assert!(!allows("a/+/c", "a/b/d", None));
        assert!(!allows("a/+/c", "a/b/c/d", None));
        assert!(allows("a/+", "a/", None), "+ matches an empty level");
        assert!(allows("a/#", "a", None), "# matches the parent level too");
        assert!(allows("a/#", "a/b/c", None));
        assert!(!allows("a/#", "ab", None));
        assert!(allows("#", "anything/at/all", None));
        assert!(!allows("#", "$SYS/x", None));
        assert!(!allows("+/x", "$SYS/x", None));
        assert!(allows("$SYS/#", "$SYS/x", None));
        assert!(!allows("a/b", "a/b/c", None));
        assert!(!allows("a/b/c", "a/b", None));
    }

    #[test]
    fn templates_take_the_identity_as_one_literal_level() {
        let rule = "devices/{device_id}/#";
        assert!(allows(rule, "devices/dev-1/telemetry", Some("dev-1")));
        assert!(allows(rule, "devices/dev-1", Some("dev-1")));
        assert!(!allows(rule, "devices/dev-2/telemetry", Some("dev-1")));
        assert!(!allows(rule, "devices/dev-1x/t", Some("dev-1")));
        assert!(!allows(rule, "devices/dev-1/t", None), "anonymous: templates match nothing");
        assert!(allows("t/dev-{client_id}-x/+", "t/dev-7-x/y", Some("7")));
        assert!(!allows("t/dev-{client_id}-x/+", "t/dev-7/y", Some("7")));
        assert!(allows("{username}", "u1", Some("u1")));
    }

    /// The classic ACL hole: a user named `#` or `+` whose name, substituted into a template,
    /// became a wildcard. Here it is text, and only a level spelled the same matches it.
    #[test]
    fn regression_wildcard_identities_never_widen_a_template() {
        for identity in ["#", "+", "+/+", "a/#", "dev-1/#", "/", ""] {
            for rule in ["devices/{device_id}/#", "devices/{username}", "devices/{client_id}/+"] {
                for topic in ["devices/dev-1/t", "devices/dev-1", "devices/x/y/z", "devices/other/t"] {
                    assert!(!allows(rule, topic, Some(identity)), "{identity:?} {rule} {topic}");
                }
            }
        }
        // A value with '/' cannot reach into another device's levels either.
        assert!(!allows("devices/{device_id}/#", "devices/a/b/t", Some("a/b")));
    }

    #[test]
    fn bad_rules_are_refused() {
        for (rule, needle) in [
            ("", "empty"),
            ("a/#/b", "last"),
            ("a/b#", "whole level"),
            ("a+/b", "whole level"),
            ("a/{device}", "unknown template"),
            ("a/{device_id", "unclosed"),
            ("a/x}", "closes"),
        ] {
            let err = TopicRule::parse(rule).unwrap_err();
            assert!(err.contains(needle), "{rule}: {err}");
        }
    }

    #[test]
    fn an_acl_allows_what_one_rule_allows() {
        let acl = Acl::new(vec![
            TopicRule::parse("devices/{device_id}/#").unwrap(),
            TopicRule::parse("shared/announce").unwrap(),
        ]);
        assert!(acl.allows_publish("shared/announce", Some("d")));
        assert!(acl.allows_publish("devices/d/x", Some("d")));
        assert!(!acl.allows_publish("devices/e/x", Some("d")));
        assert!(!Acl::default().allows_publish("anything", Some("d")), "no rule: deny");
    }
}
