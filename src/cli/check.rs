//! `chaperone check --config F`: validate without starting; every error at once.

use std::path::Path;

use super::Exit;
use crate::config::Config;

/// Validate `config`: 0 when it would start, 2 (with every error listed) when not.
pub(crate) fn command(config: &Path) -> Exit {
    match Config::load(config) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} listener(s), {} route(s), {} credential(s))",
                cfg.source,
                cfg.listeners.len(),
                cfg.routes.len(),
                cfg.credentials.len()
            );
            for r in &cfg.routes {
                let signs = r.credential.as_ref().is_some_and(|c| {
                    matches!(
                        cfg.credentials.get(c),
                        Some(crate::credentials::CredentialSpec::Aws(_))
                    )
                });
                println!("  {}", r.describe(signs));
            }
            Exit::Ok
        }
        Err(errs) => {
            super::print_config_errors(&errs);
            eprintln!("{} error(s)", errs.0.len());
            Exit::Error
        }
    }
}
