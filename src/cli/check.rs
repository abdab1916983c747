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
            Exit::Ok
        }
        Err(errs) => {
            super::print_config_errors(&errs);
            eprintln!("{} error(s)", errs.0.len());
            Exit::Error
        }
    }
}
