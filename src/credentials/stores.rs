//! Secret stores as the source of a `static` credential: AWS Secrets Manager
//! (`GetSecretValue`) and SSM Parameter Store (`GetParameter`, decrypted), read with the
//! session of one of the config's `aws` credentials.
//!
//! The value is read at start and again every `refresh`, in the background: requests never
//! wait for the store. A failed read keeps the last good value, until it is older than
//! `max_stale`; then the credential fails closed (503) until the store answers again. Before
//! the first good read, requests fail closed with the reason. The value is never logged: the
//! log and the metrics name the credential, the store's address and its fingerprint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use parking_lot::RwLock;
use secrecy::SecretString;

use super::aws::AwsSource;
use super::oauth::{Failure, FailureKind};

/// Which store, and which secret in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// Secrets Manager: the secret's name or ARN, the version stage (default `AWSCURRENT`),
    /// and for a JSON secret the key whose value is the credential.
    SecretsManager {
        /// `SecretId`.
        secret_id: String,
        /// `VersionStage`.
        version_stage: Option<String>,
        /// The field of a JSON secret.
        json_key: Option<String>,
    },
    /// SSM Parameter Store: the parameter's name, read with decryption (SecureString).
    Parameter {
        /// `Name`.
        name: String,
    },
}

/// A store-backed `static` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    /// The secret.
    pub store: Store,
    /// The `aws` credential whose session reads it.
    pub credential: String,
    /// The store's endpoint (a VPC endpoint, an emulator); `None`:
    /// `https://secretsmanager.REGION.amazonaws.com` or `https://ssm.REGION.amazonaws.com`
    /// in the region of the `aws` credential.
    pub endpoint: Option<Uri>,
    /// How often the value is read again.
    pub refresh: Duration,
    /// How long the last good value is used while reads fail.
    pub max_stale: Duration,
}

impl StoreSpec {
    /// The default endpoint of `store` in `region`.
    pub(crate) fn default_endpoint(store: &Store, region: &str) -> String {
        let service = match store {
            Store::SecretsManager { .. } => "secretsmanager",
            Store::Parameter { .. } => "ssm",
        };
        let suffix = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        format!("https://{service}.{region}.{suffix}")
    }

    /// What the log says the value came from: `secretsmanager:ID` or `ssm:NAME`.
    pub(crate) fn describe(&self) -> String {
        match &self.store {
            Store::SecretsManager { secret_id, .. } => format!("secretsmanager:{secret_id}"),
            Store::Parameter { name } => format!("ssm:{name}"),
        }
    }
}

/// One value read from a store (its `Debug` shows no value: `SecretString` redacts).
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) value: SecretString,
    pub(crate) fingerprint: String,
    pub(crate) read_at: Instant,
}

/// A store-backed credential: the last good value and the last error.
pub(crate) struct StoredCred {
    pub(crate) spec: StoreSpec,
    pub(crate) current: RwLock<Option<Arc<Read>>>,
    last_error: RwLock<Option<String>>,
}

impl StoredCred {
    pub(crate) fn new(spec: StoreSpec) -> Self {
        StoredCred {
            spec,
            current: RwLock::new(None),
            last_error: RwLock::new(None),
        }
    }

    /// The value for a request: the last good one while it is younger than `max_stale`.
    pub(crate) fn value(&self) -> Result<Arc<Read>, String> {
        let current = self.current.read().clone();
        let why = || {
            self.last_error
                .read()
                .clone()
                .unwrap_or_else(|| "no answer yet".into())
        };
        match current {
            None => Err(format!(
                "{} has not been read yet: {}",
                self.spec.describe(),
                why()
            )),
            Some(r) if r.read_at.elapsed() > self.spec.max_stale => Err(format!(
                "{} was last read {}s ago, longer than max_stale ({}s), and reading it fails: {}",
                self.spec.describe(),
                r.read_at.elapsed().as_secs(),
                self.spec.max_stale.as_secs(),
                why()
            )),
            Some(r) => Ok(r),
        }
    }

    /// Record a read's outcome; on success the new value replaces the old.
    pub(crate) fn record(&self, outcome: Result<Read, Failure>) -> Result<bool, Failure> {
        match outcome {
            Ok(read) => {
                let changed = self
                    .current
                    .read()
                    .as_ref()
                    .is_none_or(|r| r.fingerprint != read.fingerprint);
                *self.current.write() = Some(Arc::new(read));
                *self.last_error.write() = None;
                Ok(changed)
            }
            Err(e) => {
                *self.last_error.write() = Some(e.message.clone());
                Err(e)
            }
        }
    }
}

/// Read the secret once with `aws`'s session.
pub(crate) async fn read(spec: &StoreSpec, aws: &AwsSource) -> Result<SecretString, Failure> {
    let invalid = |message: String| Failure {
        kind: FailureKind::InvalidResponse,
        message,
    };
    let endpoint = match &spec.endpoint {
        Some(e) => e.clone(),
        None => StoreSpec::default_endpoint(&spec.store, &aws.spec.region)
            .parse()
            .map_err(|e| Failure {
                kind: FailureKind::Local,
                message: format!("region `{}`: {e}", aws.spec.region),
            })?,
    };
    match &spec.store {
        Store::SecretsManager {
            secret_id,
            version_stage,
            json_key,
        } => {
            let mut body = serde_json::json!({ "SecretId": secret_id });
            if let Some(stage) = version_stage {
                body["VersionStage"] = serde_json::json!(stage);
            }
            let v = aws
                .json_call(
                    "secretsmanager",
                    &endpoint,
                    "secretsmanager.GetSecretValue",
                    &body,
                )
                .await?;
            let Some(text) = v["SecretString"].as_str() else {
                return Err(invalid(format!(
                    "secret {secret_id} has no SecretString (a binary secret cannot be a header value)"
                )));
            };
            match json_key {
                None => nonempty(text, &spec.describe()),
                Some(key) => {
                    // Parsed without echoing the secret in any error.
                    let fields: serde_json::Value = serde_json::from_str(text).map_err(|_| {
                        invalid(format!(
                            "secret {secret_id} is not a JSON object, so json_key `{key}` cannot be read"
                        ))
                    })?;
                    match fields.get(key).and_then(|v| v.as_str()) {
                        Some(field) => nonempty(field, &spec.describe()),
                        None => Err(invalid(format!(
                            "secret {secret_id} has no string field `{key}`"
                        ))),
                    }
                }
            }
        }
        Store::Parameter { name } => {
            let v = aws
                .json_call(
                    "ssm",
                    &endpoint,
                    "AmazonSSM.GetParameter",
                    &serde_json::json!({ "Name": name, "WithDecryption": true }),
                )
                .await?;
            match v["Parameter"]["Value"].as_str() {
                Some(text) => nonempty(text, &spec.describe()),
                None => Err(invalid(format!(
                    "parameter {name}: the answer has no value"
                ))),
            }
        }
    }
}

/// A value trimmed of surrounding whitespace; an error when nothing is left.
fn nonempty(text: &str, what: &str) -> Result<SecretString, Failure> {
    let t = text.trim();
    if t.is_empty() {
        return Err(Failure {
            kind: FailureKind::InvalidResponse,
            message: format!("{what} is empty"),
        });
    }
    Ok(SecretString::from(t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_stale: Duration) -> StoreSpec {
        StoreSpec {
            store: Store::Parameter { name: "/p".into() },
            credential: "aws".into(),
            endpoint: None,
            refresh: Duration::from_secs(1),
            max_stale,
        }
    }

    fn read(fp: &str, age: Duration) -> Read {
        Read {
            value: SecretString::from("v".to_string()),
            fingerprint: fp.into(),
            read_at: Instant::now() - age,
        }
    }

    #[test]
    fn the_last_good_value_serves_until_max_stale() {
        let c = StoredCred::new(spec(Duration::from_secs(60)));
        let before = c.value().unwrap_err();
        assert!(before.contains("not been read yet"), "{before}");
        assert!(c.record(Ok(read("a", Duration::ZERO))).unwrap(), "new");
        assert!(!c.record(Ok(read("a", Duration::ZERO))).unwrap(), "same");
        let down = Failure {
            kind: FailureKind::Unreachable,
            message: "ssm unreachable".into(),
        };
        assert!(c.record(Err(down.clone())).is_err());
        assert_eq!(
            c.value().unwrap().fingerprint,
            "a",
            "kept through the outage"
        );
        *c.current.write() = Some(Arc::new(read("a", Duration::from_secs(61))));
        let stale = c.value().unwrap_err();
        assert!(
            stale.contains("max_stale") && stale.contains("ssm unreachable"),
            "{stale}"
        );
    }

    #[test]
    fn default_endpoints() {
        let sm = Store::SecretsManager {
            secret_id: "x".into(),
            version_stage: None,
            json_key: None,
        };
        assert_eq!(
            StoreSpec::default_endpoint(&sm, "eu-west-1"),
            "https://secretsmanager.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            StoreSpec::default_endpoint(&Store::Parameter { name: "n".into() }, "cn-north-1"),
            "https://ssm.cn-north-1.amazonaws.com.cn"
        );
    }
}
