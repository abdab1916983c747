//! `chaperone policy check|eval|test|schema`: policy work without running the sidecar.
//!
//! Exit status, the same for every subcommand: 0 success (valid, allowed, every case passed),
//! 1 the answer is no (denied, a case failed), 2 the question could not be answered (bad
//! config, bad policy, bad case file).

use std::io::Write;
use std::path::Path;

mod cases;

pub(crate) use cases::{Bench, CaseReport, Explained, WhatIf};

use super::Exit;
use crate::config::Config;
use crate::policy::{PolicyEngine, SHIPPED_SCHEMA};

/// The config as `policy` commands need it: validated, but credential and TLS files that
/// exist only where the sidecar runs may be missing (said once on stderr).
pub(crate) fn load(config: &Path, err: &mut dyn Write) -> Option<(Config, PolicyEngine)> {
    let cfg = match Config::load_offline(config) {
        Ok((c, overlooked)) => {
            if !overlooked.is_empty() {
                let keys: Vec<&str> = overlooked.iter().map(|e| e.key.as_str()).collect();
                let _ = writeln!(
                    err,
                    "note: not readable here, not needed to decide policy: {}",
                    keys.join(", ")
                );
            }
            c
        }
        Err(errs) => {
            for e in &errs.0 {
                let _ = writeln!(err, "{e}");
            }
            return None;
        }
    };
    match PolicyEngine::compile(&cfg.policy) {
        Ok(engine) => Some((cfg, engine)),
        Err(e) => {
            let _ = writeln!(err, "{e}");
            None
        }
    }
}

/// Validate the configuration's policy against its schema; list the policies and warnings.
pub(crate) fn check(config: &Path, out: &mut dyn Write, err: &mut dyn Write) -> Exit {
    let Some((cfg, engine)) = load(config, err) else {
        return Exit::Error;
    };
    let schema = match &cfg.policy.files {
        Some((_, Some(s))) => s.display().to_string(),
        _ => "the shipped schema".to_string(),
    };
    let labels: Vec<&str> = cfg.policy.label_keys.iter().map(String::as_str).collect();
    let arguments: Vec<String> = cfg
        .policy
        .mcp_arguments
        .iter()
        .map(|(k, t)| format!("{k}: {}", t.cedar()))
        .collect();
    let _ = writeln!(
        out,
        "{}: ok, {} policies valid against {schema} (route labels: {}{})",
        cfg.policy.origin,
        engine.len(),
        if labels.is_empty() {
            "none".to_string()
        } else {
            labels.join(", ")
        },
        if arguments.is_empty() {
            String::new()
        } else {
            format!("; MCP tool arguments: {}", arguments.join(", "))
        }
    );
    for id in engine.policy_ids() {
        let _ = writeln!(out, "  {id}");
    }
    for w in engine.warnings() {
        let _ = writeln!(err, "warning: {w}");
    }
    Exit::Ok
}

/// Decide one request and print the decision, the deciding policies and the reason.
pub(crate) fn eval(
    config: &Path,
    req: &WhatIf,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let Some((cfg, engine)) = load(config, err) else {
        return Exit::Error;
    };
    match Bench::new(&cfg, &engine).decide(req) {
        Ok(got) => {
            if json {
                json_line(out, &got);
            } else {
                print_explained(out, &got);
            }
            if got.decision == "allow" {
                Exit::Ok
            } else {
                Exit::Finding
            }
        }
        Err(e) => {
            let _ = writeln!(err, "chaperone policy eval: {e}");
            Exit::Error
        }
    }
}

/// `value` as one JSON line, for `--json`.
fn json_line(out: &mut dyn Write, value: &impl serde::Serialize) {
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(value).expect("serializable")
    );
}

fn print_explained(out: &mut dyn Write, got: &Explained) {
    let _ = writeln!(out, "decision:  {}", got.decision);
    let _ = writeln!(
        out,
        "policies:  {}",
        if got.policy_ids.is_empty() {
            "(none)".to_string()
        } else {
            got.policy_ids.join(", ")
        }
    );
    let _ = writeln!(out, "reason:    {}", got.reason);
    let _ = writeln!(
        out,
        "request:   {} {} {}",
        got.principal, got.action, got.resource
    );
    let _ = writeln!(
        out,
        "context:   stage={} environment={} route={} purpose={}{}",
        got.stage,
        got.environment,
        got.route.as_deref().unwrap_or("(none)"),
        got.purpose,
        got.guardrail
            .as_deref()
            .map(|g| format!(" guardrail={g}"))
            .unwrap_or_default()
    );
}

/// Decide every case of a CASES file against the configuration's policy.
pub(crate) fn test(
    config: &Path,
    cases: &Path,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let Some((cfg, engine)) = load(config, err) else {
        return Exit::Error;
    };
    let text = match std::fs::read_to_string(cases) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "{}: cannot read the file: {e}", cases.display());
            return Exit::Error;
        }
    };
    let file = cases.display().to_string();
    let report: CaseReport = match Bench::new(&cfg, &engine).run(&file, &text) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return Exit::Error;
        }
    };
    if json {
        json_line(out, &report);
    } else {
        for c in &report.cases {
            if c.passed {
                let _ = writeln!(out, "ok    {}", c.name);
            } else {
                let _ = writeln!(out, "FAIL  {} ({file}:{})", c.name, c.line);
                for p in &c.problems {
                    let _ = writeln!(out, "        {p}");
                }
            }
        }
        let failed = report.cases.iter().filter(|c| !c.passed).count();
        let _ = writeln!(
            out,
            "{} cases: {} passed, {failed} failed",
            report.cases.len(),
            report.cases.len() - failed
        );
    }
    if report.passed() {
        Exit::Ok
    } else {
        Exit::Finding
    }
}

/// Print the schema policies are validated against: the shipped one, with the
/// configuration's route label keys when a config is given (or the config's own schema). A
/// config whose policy does not validate is an error: without `--config` the shipped
/// schema is printed.
pub(crate) fn schema(config: Option<&Path>, out: &mut dyn Write, err: &mut dyn Write) -> Exit {
    let text = match config {
        None => SHIPPED_SCHEMA.to_string(),
        Some(c) => match Config::load_offline(c) {
            Ok((cfg, _)) => cfg.policy.schema_text().into_owned(),
            Err(errs) => {
                for e in &errs.0 {
                    let _ = writeln!(err, "{e}");
                }
                return Exit::Error;
            }
        },
    };
    let _ = write!(out, "{text}");
    Exit::Ok
}

/// `chaperone policy ...`: the status the subcommand chose (module docs).
pub(crate) fn command(cmd: super::PolicyCmd) -> Exit {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match cmd {
        super::PolicyCmd::Check { config } => check(&config, &mut out, &mut err),
        super::PolicyCmd::Eval {
            config,
            request,
            json,
        } => eval(&config, &request, json, &mut out, &mut err),
        super::PolicyCmd::Test {
            config,
            cases,
            json,
        } => test(&config, &cases, json, &mut out, &mut err),
        super::PolicyCmd::Schema { config } => schema(config.as_deref(), &mut out, &mut err),
    }
}
