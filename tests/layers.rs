//! The floors: every import goes down a floor, and no modules import each other in a circle.
//!
//! The floor of each top-level module is read from the table that opens `src/lib.rs` (the map a
//! newcomer reads first), so the map and the rule cannot drift apart. A module may import from the
//! floors below its own; two top-level modules on the same floor may not import each other.
//! Inside a top-level folder, its modules may import each other only without a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A source file: its module path below `crate` (`["domain", "delivery", "receipt"]`) and text.
type File = (Vec<String>, String);

/// floors reads the `| floor | module | … |` table of lib.rs's doc comment.
fn floors(lib: &str) -> BTreeMap<String, u32> {
    lib.lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let floor = cells.get(1)?.parse().ok()?;
            let module = cells.get(2)?.trim_matches('`');
            Some((module.to_string(), floor))
        })
        .collect()
}

/// module_of is a file's module path: `domain/delivery/mod.rs` is `domain::delivery`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// references are the module paths a file names, at most two segments deep below `crate`: after
/// `crate::`, in plain paths and in grouped imports (`use crate::{a::b, c}`), and after `super::`
/// and `self::`, resolved against the file's own module path. Comments are skipped.
fn references(module: &[String], text: &str) -> BTreeSet<Vec<String>> {
    let code: String = text.lines().map(without_comment).collect::<Vec<_>>().join("\n");
    let mut out = BTreeSet::new();
    let segment = |s: &str| -> Option<String> {
        let name: String =
            s.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        (!name.is_empty()).then_some(name)
    };
    // A path below `base`, as far as it names modules, cut to two segments below `crate`.
    let mut add = |base: &[String], rest: &str| {
        let mut path = base.to_vec();
        let mut parts = rest.split("::");
        while path.len() < 2 {
            match parts.next().and_then(|p| segment(p.trim())) {
                Some(name) if name != "self" => path.push(name),
                _ => break,
            }
        }
        path.truncate(2);
        if !path.is_empty() {
            out.insert(path);
        }
    };
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
        ("self::", module.to_vec()),
    ] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let preceded = rest[..at].chars().next_back();
            let after = &rest[at + prefix.len()..];
            rest = after;
            // `crate::` inside a longer path (`assetflow::crate::`) or `super::super::`, once.
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_')
                || (prefix == "super::" && after.starts_with("super::"))
            {
                continue;
            }
            if let Some(group) = after.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    add(&base, item.trim());
                }
            } else {
                add(&base, after);
            }
        }
    }
    out
}

/// without_comment is a line without its `//` comment; a `//` right after a `:` is a URL in a
/// string, not a comment.
fn without_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    (0..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'/' && bytes[i + 1] == b'/' && (i == 0 || bytes[i - 1] != b':'))
        .map_or(line, |at| &line[..at])
}

/// circles are the strongly connected components of more than one node (Tarjan's algorithm).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let low = s.low[v].min(s.low[w.as_str()]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w.as_str()) {
                let low = s.low[v].min(s.index[w.as_str()]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

/// violations lists every import that goes up or across a floor, every top-level module missing
/// from the table, and every circle inside a top-level folder.
fn violations(files: &[File], floors: &BTreeMap<String, u32>) -> Vec<String> {
    let mut out = Vec::new();
    let mut inner: BTreeMap<&str, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, text) in files {
        let Some(top) = module.first() else { continue };
        let Some(&floor) = floors.get(top) else {
            out.push(format!("src/{}: module {top} is on no floor of the table in src/lib.rs", module.join("/")));
            continue;
        };
        for reference in references(module, text) {
            let target = &reference[0];
            if target == top {
                if let (Some(child), Some(other)) = (module.get(1), reference.get(1))
                    && child != other
                {
                    inner.entry(top).or_default().entry(child.clone()).or_default().insert(other.clone());
                }
                continue;
            }
            match floors.get(target) {
                Some(&to) if to < floor => {}
                Some(&to) => out.push(format!(
                    "{} (floor {floor}) imports crate::{} (floor {to}): imports go only down a floor",
                    module.join("::"),
                    reference.join("::")
                )),
                None => {}
            }
        }
    }
    for (top, graph) in inner {
        for circle in circles(&graph) {
            out.push(format!("circle inside {top}/: {}", circle.join(" ")));
        }
    }
    out
}

/// sources reads every `.rs` file below `src/`.
fn sources(dir: &Path, root: &Path, out: &mut Vec<File>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("a source file is UTF-8");
            out.push((module_of(path.strip_prefix(root).expect("below src")), text));
        }
    }
}

fn repository() -> (Vec<File>, BTreeMap<String, u32>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    (files, floors(&lib))
}

#[test]
fn every_import_goes_down_a_floor_and_no_modules_import_each_other_in_a_circle() {
    let (files, floors) = repository();
    assert!(floors.len() >= 7, "the table in src/lib.rs names the floors: {floors:?}");
    let found = violations(&files, &floors);
    assert!(found.is_empty(), "the floors are broken:\n{}", found.join("\n"));
}

#[test]
fn every_top_level_module_declared_in_lib_rs_is_on_a_floor() {
    let (files, floors) = repository();
    let lib = &files.iter().find(|(module, _)| module.is_empty()).expect("lib.rs").1;
    for line in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
        let module = line.trim_end_matches(';');
        assert!(floors.contains_key(module), "src/lib.rs declares {module}, which the floor table does not name");
    }
}

/// The checker itself: it must see what it is there to forbid.
fn file(path: &str, text: &str) -> File {
    (module_of(Path::new(path)), text.to_string())
}

fn table() -> BTreeMap<String, u32> {
    floors(
        "//! | 4 | `service` | x |\n//! | 3 | `domain` | x |\n//! | 2 | `runtime` | x |\n//! | 1 | `contracts` | x |\n//! | 0 | `config` | x |\n//! | 0 | `crypto` | x |",
    )
}

#[test]
fn an_import_of_the_service_inside_the_domain_is_found() {
    let files = [file("domain/delivery/mod.rs", "use crate::service::app::App;\nuse crate::runtime::db;")];
    let found = violations(&files, &table());
    assert_eq!(
        found,
        vec!["domain::delivery (floor 3) imports crate::service::app (floor 4): imports go only down a floor"]
    );
}

#[test]
fn an_import_of_the_domain_inside_the_runtime_is_found_in_a_grouped_use_too() {
    let files = [file("runtime/consumer/handler.rs", "use crate::{config, domain::catalogue::Terminal};")];
    let found = violations(&files, &table());
    assert_eq!(
        found,
        vec![
            "runtime::consumer::handler (floor 2) imports crate::domain::catalogue (floor 3): imports go only down a floor"
        ]
    );
}

#[test]
fn an_import_across_one_floor_is_found_and_one_in_a_comment_is_not() {
    let files = [file("config/mod.rs", "// crate::crypto is not used here\nfn f() { crate::crypto::sign(); }")];
    let found = violations(&files, &table());
    assert_eq!(found, vec!["config (floor 0) imports crate::crypto::sign (floor 0): imports go only down a floor"]);
}

#[test]
fn a_circle_between_two_modules_of_one_floor_is_found() {
    let files = [
        file("domain/settlement/mod.rs", "use crate::domain::delivery::Deliveries;"),
        file("domain/delivery/mod.rs", "fn f() { crate::domain::settlement::instruct(); }"),
        file("domain/issuance/mod.rs", "use crate::domain::delivery;"),
    ];
    assert_eq!(violations(&files, &table()), vec!["circle inside domain/: delivery settlement"]);
}

#[test]
fn a_circle_through_super_is_found_too() {
    let files = [
        file("contracts/messages.rs", "fn decode() { super::schema::validate(); }"),
        file("contracts/schema.rs", "use super::messages::kinds;\nconst URL: &str = \"amqp://x\"; // crate::domain"),
    ];
    assert_eq!(violations(&files, &table()), vec!["circle inside contracts/: messages schema"]);
}

#[test]
fn a_module_on_no_floor_is_found() {
    let files = [file("telemetry.rs", "")];
    assert_eq!(
        violations(&files, &table()),
        vec!["src/telemetry: module telemetry is on no floor of the table in src/lib.rs"]
    );
}
