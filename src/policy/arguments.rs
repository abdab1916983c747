//! `context.mcp.arguments`: what policy may read of an MCP tool call's arguments.
//!
//! Cedar validates policies against a schema with closed records, so a policy can only read
//! arguments the configuration declares (`routes[].tools.<tool>.arguments: {repo: String}`);
//! the shipped schema's `McpArguments` record is given those attributes, each optional. At
//! decision time the call's JSON arguments become that record: declared arguments that are
//! present and of their declared type are in it, undeclared ones are left out (no policy
//! can name them). When a declared argument is present with another type (a list where a
//! string was declared), the arguments do not fit the schema and `arguments` is absent: a
//! permit that needs `context.mcp.arguments.repo == "public"` does not apply, so the call is
//! denied by default. (Write such rules as permits; a forbid on an argument's value is only
//! as strong as the type check in front of it.)
//!
//! When `tools/list` is filtered, a tool's arguments are not known yet: what policies read
//! of them is an unknown in Cedar's partial evaluation, and a tool is hidden only when policy
//! denies it whatever its arguments are (`PolicyEngine::may_permit`).

use std::collections::BTreeMap;

use cedar_policy::RestrictedExpression;
use serde_json::Value;

/// The Cedar type of a declared argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON string.
    String,
    /// A JSON integer that fits in 64 bits.
    Long,
    /// `true` or `false`.
    Bool,
    /// A JSON array of strings.
    SetOfString,
    /// A JSON array of integers.
    SetOfLong,
}

/// Declared arguments, by name.
pub type Declared = BTreeMap<String, ArgType>;

impl ArgType {
    /// The types a configuration may name, as Cedar spells them.
    pub const NAMES: [&'static str; 5] = ["String", "Long", "Bool", "Set<String>", "Set<Long>"];

    /// Read a type as the configuration writes it (Cedar's spelling; spaces ignored).
    pub fn parse(s: &str) -> Option<ArgType> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        Some(match s.as_str() {
            "String" => ArgType::String,
            "Long" => ArgType::Long,
            "Bool" => ArgType::Bool,
            "Set<String>" => ArgType::SetOfString,
            "Set<Long>" => ArgType::SetOfLong,
            _ => return None,
        })
    }

    /// The type in Cedar schema syntax.
    pub fn cedar(self) -> &'static str {
        match self {
            ArgType::String => "String",
            ArgType::Long => "Long",
            ArgType::Bool => "Bool",
            ArgType::SetOfString => "Set<String>",
            ArgType::SetOfLong => "Set<Long>",
        }
    }

    /// The value as a Cedar expression, or `None` when it is not of this type.
    fn convert(self, v: &Value) -> Option<RestrictedExpression> {
        let set = |items: &Vec<Value>, one: fn(&Value) -> Option<RestrictedExpression>| {
            items
                .iter()
                .map(one)
                .collect::<Option<Vec<_>>>()
                .map(RestrictedExpression::new_set)
        };
        let string = |v: &Value| {
            v.as_str()
                .map(|s| RestrictedExpression::new_string(s.into()))
        };
        let long = |v: &Value| v.as_i64().map(RestrictedExpression::new_long);
        match (self, v) {
            (ArgType::String, _) => string(v),
            (ArgType::Long, _) => long(v),
            (ArgType::Bool, Value::Bool(b)) => Some(RestrictedExpression::new_bool(*b)),
            (ArgType::SetOfString, Value::Array(items)) => set(items, string),
            (ArgType::SetOfLong, Value::Array(items)) => set(items, long),
            _ => None,
        }
    }
}

/// The `McpArguments` record type for these declarations (attribute names quoted, so any
/// name a tool uses can be declared).
pub(crate) fn schema_type(declared: &Declared) -> String {
    let fields: Vec<String> = declared
        .iter()
        .map(|(k, t)| format!("{}?: {}", Value::String(k.clone()), t.cedar()))
        .collect();
    format!("type McpArguments = {{ {} }};", fields.join(", "))
}

/// The record policy sees for a call's `arguments` (absent counts as `{}`), or `None` when a
/// declared argument is there with another type.
pub(crate) fn record(
    declared: &Declared,
    arguments: Option<&Value>,
) -> Option<RestrictedExpression> {
    let given = match arguments {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return None,
    };
    let mut attrs = Vec::new();
    for (name, ty) in declared {
        if let Some(v) = given.and_then(|m| m.get(name)) {
            attrs.push((name.clone(), ty.convert(v)?));
        }
    }
    RestrictedExpression::new_record(attrs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared() -> Declared {
        BTreeMap::from([
            ("repo".to_string(), ArgType::String),
            ("limit".to_string(), ArgType::Long),
            ("tags".to_string(), ArgType::SetOfString),
            ("dry-run".to_string(), ArgType::Bool),
        ])
    }

    #[test]
    fn types_parse_as_cedar_spells_them() {
        for n in ArgType::NAMES {
            assert_eq!(ArgType::parse(n).unwrap().cedar(), n);
        }
        assert_eq!(ArgType::parse("Set< Long >"), Some(ArgType::SetOfLong));
        assert_eq!(ArgType::parse("string"), None);
        assert_eq!(ArgType::parse("Record"), None);
    }

    #[test]
    fn arguments_fit_or_are_absent() {
        let d = declared();
        let fits = json!({"repo": "public", "limit": 5, "tags": ["a"], "query": {"deep": 1}});
        assert!(
            record(&d, Some(&fits)).is_some(),
            "undeclared ones are left out"
        );
        assert!(
            record(&d, None).is_some(),
            "no arguments is the empty record"
        );
        for unfit in [
            json!({"repo": ["public"]}),
            json!({"limit": "5"}),
            json!({"limit": 1.5}),
            json!({"tags": ["a", 1]}),
            json!({"dry-run": "true"}),
            json!(["public"]),
        ] {
            assert!(record(&d, Some(&unfit)).is_none(), "{unfit}");
        }
    }

    #[test]
    fn schema_type_quotes_names() {
        assert_eq!(
            schema_type(&declared()),
            r#"type McpArguments = { "dry-run"?: Bool, "limit"?: Long, "repo"?: String, "tags"?: Set<String> };"#
        );
    }
}
