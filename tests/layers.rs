//! The module map holds: every `crate::` path in `src/` (outside unit tests and comments) is
//! resolved to the file it names, and a file may only reach down the map in `src/lib.rs`:
//!
//! ```text
//! 6 cli, main      the subcommands (and fuzzing: the fuzz targets' invariants)
//! 5 sidecar        the composition root
//! 4 config         the loader: builds each stage's settings
//! 3 ingress        proxy (listener, http, worker, connect, intercept, attest), admin
//! 2 pipeline       the ordered stages
//! 1 stages         target, identify, route, mcp, strip, policy, credentials, purpose_log, and the
//!                  transport below the pipeline: proxy (settings), proxy::upstream, upgrade,
//!                  drain, idle
//! 0 foundations    error, metrics, fingerprint, files, tls, egress
//! ```
//!
//! Within a layer a file may reach its own layer, except that no stage reaches into the
//! transport, and the top-level modules of a layer form no cycle. A failure names the file,
//! the line and the path that goes the wrong way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, as a module path (`proxy::upstream`, `strip`, ...).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if path.is_dir() {
                walk(&path, &format!("{prefix}{name}::"), out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "mod" => prefix.trim_end_matches("::").to_string(),
                    _ => format!("{prefix}{name}"),
                };
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), "", &mut out);
    out
}

/// The layer of a module, and whether it is transport (below the pipeline).
fn layer(module: &str) -> (u8, bool) {
    let top = module.split("::").next().unwrap();
    match (top, module) {
        ("main" | "cli" | "fuzzing", _) => (6, false),
        ("sidecar", _) => (5, false),
        ("config", _) => (4, false),
        (
            "proxy",
            "proxy" | "proxy::upstream" | "proxy::pool" | "proxy::slots" | "proxy::upgrade"
            | "proxy::drain" | "proxy::idle",
        ) => (1, true),
        ("proxy" | "admin", _) => (3, false),
        ("pipeline", _) => (2, false),
        (
            "target" | "identify" | "route" | "strip" | "policy" | "credentials" | "purpose_log"
            | "mcp",
            _,
        ) => (1, false),
        (
            "error" | "metrics" | "fingerprint" | "files" | "tls" | "egress" | "resolve" | "lib",
            _,
        ) => (0, false),
        _ => panic!(
            "src/ has a module the layer map does not place: `{module}` (add it to tests/layers.rs and to the map in src/lib.rs)"
        ),
    }
}

/// The code of a file without comments, string literals and its unit tests, line by line.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let body = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    body.lines()
        .enumerate()
        .map(|(i, l)| {
            // Drop string literals (a path inside a message is not an import), then comments.
            let mut out = String::new();
            let mut in_str = false;
            let mut prev = ' ';
            for c in l.chars() {
                if c == '"' && prev != '\\' {
                    in_str = !in_str;
                } else if !in_str {
                    out.push(c);
                }
                prev = c;
            }
            let code = out.split("//").next().unwrap_or("").to_string();
            (i + 1, code)
        })
        .collect()
}

/// Expand the use tree that starts right after `crate::` in `s` into full paths.
fn expand(s: &str) -> Vec<String> {
    fn tree(s: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut path = prefix.to_string();
        loop {
            let start = *i;
            while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_') {
                *i += 1;
            }
            let seg = std::str::from_utf8(&s[start..*i]).unwrap();
            if !seg.is_empty() {
                if !path.is_empty() {
                    path.push_str("::");
                }
                path.push_str(seg);
            }
            let group = if s[*i..].starts_with(b"::{") {
                3
            } else if seg.is_empty() && s[*i..].starts_with(b"{") {
                1
            } else {
                0
            };
            if group > 0 {
                *i += group;
                loop {
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    if *i >= s.len() || s[*i] == b'}' {
                        *i += 1;
                        return;
                    }
                    tree(s, i, &path, out);
                    while *i < s.len() && (s[*i] == b',' || s[*i].is_ascii_whitespace()) {
                        *i += 1;
                    }
                }
            } else if s[*i..].starts_with(b"::") {
                *i += 2;
            } else {
                // `as alias`, `;`, `(`, ... end the path.
                while *i < s.len() && !matches!(s[*i], b',' | b'}') {
                    *i += 1;
                }
                out.push(path);
                return;
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    tree(s.as_bytes(), &mut i, "", &mut out);
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve<'a>(path: &str, modules: &'a BTreeMap<String, PathBuf>) -> Option<&'a str> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find_map(|p| modules.get_key_value(&p).map(|(k, _)| k.as_str()))
}

/// Every (line, module reached) of a file.
fn reaches(file: &Path, modules: &BTreeMap<String, PathBuf>) -> Vec<(usize, String, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    // `use crate::{...}` spans lines: join each statement before expanding.
    let lines = code_lines(&text);
    let joined: String = lines
        .iter()
        .map(|(n, l)| format!("\u{1}{n}\u{2}{l}\n"))
        .collect();
    let mut out = Vec::new();
    let mut line = 0;
    let mut rest = joined.as_str();
    while let Some(i) = rest.find("crate::") {
        if let Some(m) = rest[..i].rfind('\u{1}') {
            let n = &rest[m + 1..];
            line = n[..n.find('\u{2}').unwrap()].parse().unwrap();
        }
        let after = &rest[i + "crate::".len()..];
        let flat: String = after
            .chars()
            .take(2000)
            .filter(|c| *c != '\n')
            .collect::<String>()
            .split('\u{1}')
            .map(|part| part.split_once('\u{2}').map_or(part, |(_, l)| l))
            .collect();
        for path in expand(&flat) {
            if let Some(m) = resolve(&path, modules) {
                out.push((line, m.to_string(), path));
            }
        }
        rest = after;
    }
    out
}

#[test]
fn modules_only_reach_down_the_map() {
    let modules = modules();
    let mut wrong = Vec::new();
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let (from, from_transport) = layer(module);
        for (line, to, path) in reaches(file, &modules) {
            let (to_layer, to_transport) = layer(&to);
            // The proxy's transport half (below the pipeline) is its own node here.
            let node = |m: &str, transport: bool| match (m.split("::").next().unwrap(), transport) {
                ("proxy", true) => "proxy(transport)".to_string(),
                (top, _) => top.to_string(),
            };
            let (a, b) = (node(module, from_transport), node(&to, to_transport));
            if a != b {
                tops.entry(a).or_default().insert(b);
            }
            let why = if to_layer > from {
                Some("reaches up the map")
            } else if to_layer == 1 && from == 1 && to_transport && !from_transport {
                Some("a stage reaches into the transport")
            } else {
                None
            };
            if let Some(why) = why {
                let rel = file.strip_prefix(src().parent().unwrap()).unwrap();
                wrong.push(format!(
                    "{}:{line}: `{module}` (layer {from}) -> `crate::{path}` (`{to}`, layer {to_layer}): {why}",
                    rel.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}\n", wrong.join("\n"));

    // No cycle between top-level modules (a module's own files may reach each other).
    let mut cycles = Vec::new();
    for start in tops.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in tops.get(&at).into_iter().flatten() {
                if next == start {
                    cycles.push(format!("{} -> {start}", trail.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

/// The checker itself: it must see through use trees, aliases, line breaks and comments, or
/// the test above could pass on code that breaks the map.
#[test]
fn the_checker_sees_every_form_of_path() {
    assert_eq!(
        expand("{a::{b, c::D}, e as f};"),
        vec!["a::b", "a::c::D", "e"]
    );
    assert_eq!(
        expand("proxy::upstream::prepare(&mut x)"),
        vec!["proxy::upstream::prepare"]
    );
    let mods: BTreeMap<String, PathBuf> = ["proxy", "proxy::upstream", "config"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    assert_eq!(
        resolve("proxy::upstream::Upstream", &mods),
        Some("proxy::upstream")
    );
    assert_eq!(resolve("proxy::Timeouts", &mods), Some("proxy"));
    assert_eq!(resolve("config::Config", &mods), Some("config"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.rs");
    std::fs::write(
        &file,
        "use crate::{\n    proxy::upstream,\n    config::Config,\n};\n// crate::cli is a comment\nfn f() { let _ = \"crate::cli\"; crate::proxy::X; }\n#[cfg(test)]\nmod tests { use crate::cli; }\n",
    )
    .unwrap();
    let found: Vec<(usize, String)> = reaches(&file, &mods)
        .into_iter()
        .map(|(l, m, _)| (l, m))
        .collect();
    assert_eq!(
        found,
        vec![
            (1, "proxy::upstream".to_string()),
            (1, "config".to_string()),
            (6, "proxy".to_string())
        ]
    );
    // And the map places what it must.
    assert_eq!(layer("config"), (4, false));
    assert_eq!(layer("proxy::upstream"), (1, true));
    assert_eq!(layer("proxy::connect"), (3, false));
    assert_eq!(layer("strip::body"), (1, false));
}
