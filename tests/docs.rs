//! The documentation's links resolve. In README.md, every docs/*.md and ops/RUNBOOK.md, every
//! relative markdown link, `[text](path)`, `[text](path#anchor)` or `[text](#anchor)` (and a
//! reference definition, `[label]: path`), must name a file or directory that exists relative to
//! the linking file, and its anchor must be a heading of the target markdown file as GitHub slugs
//! it: lowercase, punctuation other than `-` and `_` removed, each space a `-`, and a repeated
//! heading numbered `-1`, `-2`, … Links to `http(s)://` and `mailto:` addresses are not followed,
//! and nothing inside a fenced code block or inline code is a link. Plain std: no crate needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// root is the repository whose documentation is checked.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// documents lists the markdown files whose links are checked, relative to `root`: the README,
/// every `docs/*.md` and the runbook.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = match fs::read_dir(root.join("docs")) {
        Ok(dir) => dir
            .filter_map(Result::ok)
            .map(|entry| PathBuf::from("docs").join(entry.file_name()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
            .collect(),
        Err(_) => Vec::new(),
    };
    docs.sort();
    let mut files = vec![PathBuf::from("README.md")];
    files.extend(docs);
    files.push(PathBuf::from("ops/RUNBOOK.md"));
    files
}

/// Paragraph is a run of consecutive non-blank lines outside fenced code, joined with `\n`, and
/// the number of its first line.
struct Paragraph {
    first_line: usize,
    text: String,
}

/// fence_opening returns the fence character and length if `line` opens a fenced code block.
/// Fences inside list items are indented, so any indentation is accepted.
fn fence_opening(line: &str) -> Option<(char, usize)> {
    let trimmed = line.trim_start();
    let ch = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let run = trimmed.chars().take_while(|c| *c == ch).count();
    // A backtick fence's info string may not hold a backtick: "```x```" is inline code.
    (run >= 3 && !(ch == '`' && trimmed[run..].contains('`'))).then_some((ch, run))
}

/// fence_closes says whether `line` closes a block opened with `fence`.
fn fence_closes(line: &str, (ch, len): (char, usize)) -> bool {
    let trimmed = line.trim_start();
    let run = trimmed.chars().take_while(|c| *c == ch).count();
    run >= len && trimmed[run * ch.len_utf8()..].trim().is_empty()
}

/// prose splits markdown into the lines outside fenced code blocks, as `(line number, text)`.
fn prose(markdown: &str) -> Vec<(usize, &str)> {
    let mut lines = Vec::new();
    let mut fence = None;
    for (index, line) in markdown.lines().enumerate() {
        match fence {
            Some(open) => {
                if fence_closes(line, open) {
                    fence = None;
                }
            }
            None => match fence_opening(line) {
                Some(open) => fence = Some(open),
                None => lines.push((index + 1, line)),
            },
        }
    }
    lines
}

/// paragraphs groups the prose lines into paragraphs: a blank line or a fenced block ends one.
fn paragraphs(markdown: &str) -> Vec<Paragraph> {
    let mut paragraphs: Vec<Paragraph> = Vec::new();
    let mut last_line = 0;
    for (number, line) in prose(markdown) {
        if line.trim().is_empty() {
            last_line = 0;
            continue;
        }
        match paragraphs.last_mut() {
            Some(paragraph) if last_line + 1 == number => {
                paragraph.text.push('\n');
                paragraph.text.push_str(line);
            }
            _ => paragraphs.push(Paragraph { first_line: number, text: line.to_string() }),
        }
        last_line = number;
    }
    paragraphs
}

/// code_spans returns the char ranges `[start, end)` of the inline code spans in `chars`, backticks
/// included: a run of n backticks opens a span that the next run of exactly n backticks closes; a
/// run with no closer is literal, and a backslash escapes a backtick outside a span.
fn code_spans(chars: &[char]) -> Vec<(usize, usize)> {
    let run_at = |i: usize| chars[i..].iter().take_while(|c| **c == '`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '`' => {
                let run = run_at(i);
                let mut j = i + run;
                let mut closed = None;
                while j < chars.len() {
                    if chars[j] == '`' {
                        let other = run_at(j);
                        if other == run {
                            closed = Some(j + other);
                            break;
                        }
                        j += other;
                    } else {
                        j += 1;
                    }
                }
                match closed {
                    Some(end) => {
                        spans.push((i, end));
                        i = end;
                    }
                    None => i += run,
                }
            }
            _ => i += 1,
        }
    }
    spans
}

/// without_code blanks every inline code span, keeping line breaks, so that nothing in code is
/// taken for a link.
fn without_code(text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for (start, end) in code_spans(&chars) {
        for c in &mut chars[start..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    }
    chars.into_iter().collect()
}

/// destination reads a link destination at the start of `rest` (just after `](`): `<...>`, or
/// everything up to white space or the `)` that closes the link, parentheses balanced.
fn destination(rest: &str) -> Option<String> {
    let rest = rest.trim_start_matches([' ', '\t']);
    if let Some(inner) = rest.strip_prefix('<') {
        return inner.find('>').map(|end| inner[..end].to_string());
    }
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(rest[..i].to_string()),
            ')' => depth -= 1,
            c if c.is_whitespace() => return Some(rest[..i].to_string()),
            _ => {}
        }
    }
    None
}

/// Link is a link found in a document.
struct Link {
    line: usize,
    destination: String,
}

/// links lists the inline links and reference definitions of a markdown document, outside code.
fn links(markdown: &str) -> Vec<Link> {
    let mut found = Vec::new();
    for paragraph in paragraphs(markdown) {
        let text = without_code(&paragraph.text);
        let line_of = |at: usize| paragraph.first_line + text[..at].matches('\n').count();
        for (at, _) in text.match_indices("](") {
            if let Some(destination) = destination(&text[at + 2..]) {
                found.push(Link { line: line_of(at), destination });
            }
        }
        // Reference definitions: `[label]: destination` at the start of a line.
        let mut offset = 0;
        for line in text.split('\n') {
            let trimmed = line.trim_start();
            if trimmed.starts_with('[')
                && !trimmed.starts_with("[^")
                && let Some(close) = trimmed.find("]:")
                && let Some(destination) = trimmed[close + 2..].split_whitespace().next()
            {
                let destination = destination.trim_start_matches('<').trim_end_matches('>');
                found.push(Link { line: line_of(offset), destination: destination.to_string() });
            }
            offset += line.len() + 1;
        }
    }
    found
}

/// heading_text renders a heading's markdown as the text GitHub slugs: inline code keeps its
/// content, a link or an image its text, HTML tags and backslashes before punctuation go.
fn heading_text(markdown: &str) -> String {
    let chars: Vec<char> = markdown.chars().collect();
    let spans = code_spans(&chars);
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if let Some(&(start, end)) = spans.iter().find(|(start, _)| *start == i) {
            let inner: String = chars[start..end].iter().collect();
            out.push_str(inner.trim_matches('`').trim_matches(' '));
            i = end;
            continue;
        }
        match chars[i] {
            '\\' if i + 1 < chars.len() && chars[i + 1].is_ascii_punctuation() => {
                out.push(chars[i + 1]);
                i += 2;
            }
            // `](url)` of a link or an image: the text before it stays, the destination goes.
            ']' if chars.get(i + 1) == Some(&'(') => match chars[i + 2..].iter().position(|c| *c == ')') {
                Some(close) => i += close + 3,
                None => i += 1,
            },
            '<' => match chars[i..].iter().position(|c| *c == '>') {
                Some(close) if chars.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic() || *c == '/') => i += close + 1,
                _ => {
                    out.push('<');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// slug is GitHub's anchor for a heading's text: lowercase, every character that is not a letter,
/// a digit, `-`, `_` or a space removed, and each space made a `-`.
fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Slugger numbers repeated slugs as GitHub does: the second `a` is `a-1`, the third `a-2`, and
/// a number is never given to two headings.
#[derive(Default)]
struct Slugger {
    occurrences: BTreeMap<String, usize>,
}

impl Slugger {
    fn slug(&mut self, text: &str) -> String {
        let base = slug(text);
        let mut result = base.clone();
        if let Some(&seen) = self.occurrences.get(&base) {
            let mut count = seen;
            loop {
                count += 1;
                result = format!("{base}-{count}");
                if !self.occurrences.contains_key(&result) {
                    break;
                }
            }
            self.occurrences.insert(base, count);
        }
        self.occurrences.insert(result.clone(), 0);
        result
    }
}

/// atx_heading returns the text of an ATX heading (`## Text ##`), if `line` is one.
fn atx_heading(line: &str) -> Option<&str> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &trimmed[level..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let rest = rest.trim();
    // A closing sequence of `#`s, after a space, is not part of the text.
    let without_closing = rest.trim_end_matches('#');
    Some(if without_closing.is_empty() || without_closing.ends_with([' ', '\t']) {
        without_closing.trim_end()
    } else {
        rest
    })
}

/// setext_underline says whether `line` underlines the line before it into a heading.
fn setext_underline(line: &str) -> bool {
    let trimmed = line.trim_start_matches(' ');
    let body = trimmed.trim_end();
    line.len() - trimmed.len() <= 3
        && !body.is_empty()
        && (body.chars().all(|c| c == '=') || body.chars().all(|c| c == '-'))
}

/// paragraph_line says whether a line could be the text of a setext heading: not a list item, a
/// quote, a table row, a heading or indented code.
fn paragraph_line(line: &str) -> bool {
    let trimmed = line.trim_start();
    let ordered = trimmed.chars().take_while(char::is_ascii_digit).count();
    let list_item = ordered > 0 && trimmed[ordered..].starts_with(['.', ')']);
    let indented_code = line.len() - line.trim_start_matches(' ').len() >= 4;
    !(trimmed.is_empty() || indented_code || list_item || trimmed.starts_with(['-', '*', '+', '>', '|', '#', '<']))
}

/// html_ids lists the `id="…"` and `name="…"` attributes in a line, which are anchors too.
fn html_ids(line: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for attribute in [" id=\"", " name=\""] {
        for (at, _) in line.match_indices(attribute) {
            let rest = &line[at + attribute.len()..];
            if let Some(end) = rest.find('"') {
                ids.push(rest[..end].to_string());
            }
        }
    }
    ids
}

/// anchors lists every anchor of a markdown document: its headings' slugs, numbered as GitHub
/// numbers repeats, and its HTML ids.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut slugger = Slugger::default();
    let mut anchors = BTreeSet::new();
    let lines = prose(markdown);
    for (i, &(number, line)) in lines.iter().enumerate() {
        anchors.extend(html_ids(line));
        if let Some(text) = atx_heading(line) {
            anchors.insert(slugger.slug(&heading_text(text)));
            continue;
        }
        if setext_underline(line) && i > 0 {
            let (previous_number, previous) = lines[i - 1];
            if previous_number + 1 == number && paragraph_line(previous) && atx_heading(previous).is_none() {
                anchors.insert(slugger.slug(&heading_text(previous.trim())));
            }
        }
    }
    anchors
}

/// is_external says whether a destination is a URL with a scheme (`https:`, `mailto:`, …), which
/// is not followed.
fn is_external(destination: &str) -> bool {
    let scheme: String = destination.chars().take_while(|c| c.is_ascii_alphanumeric() || "+.-".contains(*c)).collect();
    !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && destination[scheme.len()..].starts_with(':')
        // One letter before a colon would be a drive, not a scheme.
        && scheme.len() > 1
}

/// percent_decode decodes `%XX` escapes, as a browser does before it looks a path up.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// normalize resolves `.` and `..` in a path without touching the file system; `None` if it
/// climbs above where it started.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// check returns every broken link of `files` (relative to `root`), as `file:line: problem`.
fn check(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut anchors_of: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let markdown = match fs::read_to_string(root.join(file)) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("{}: cannot be read: {e}", file.display()));
                continue;
            }
        };
        for link in links(&markdown) {
            let at = format!("{}:{}", file.display(), link.line);
            let destination = link.destination.as_str();
            if destination.is_empty() {
                problems.push(format!("{at}: a link with no destination"));
                continue;
            }
            if is_external(destination) {
                continue;
            }
            let (path, anchor) = match destination.split_once('#') {
                Some((path, anchor)) => (path, Some(percent_decode(anchor))),
                None => (destination, None),
            };
            let path = percent_decode(path.split('?').next().unwrap_or(""));
            let target = if path.is_empty() {
                Some(file.clone())
            } else if let Some(from_root) = path.strip_prefix('/') {
                normalize(Path::new(from_root))
            } else {
                normalize(&file.parent().unwrap_or(Path::new("")).join(&path))
            };
            let Some(target) = target else {
                problems.push(format!("{at}: {destination}: the path climbs out of the repository"));
                continue;
            };
            let full = root.join(&target);
            if !full.exists() {
                problems.push(format!("{at}: {destination}: {} does not exist", target.display()));
                continue;
            }
            let Some(anchor) = anchor.filter(|anchor| !anchor.is_empty()) else { continue };
            if full.is_file() && target.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("md")) {
                let known = anchors_of
                    .entry(target.clone())
                    .or_insert_with(|| fs::read_to_string(&full).map(|text| anchors(&text)).unwrap_or_default());
                if !known.contains(&anchor) {
                    problems.push(format!("{at}: {destination}: {} has no heading #{anchor}", target.display()));
                }
            } else if !(full.is_file() && is_line_anchor(&anchor)) {
                problems.push(format!("{at}: {destination}: #{anchor} on {}, which has no headings", target.display()));
            }
        }
    }
    problems
}

/// is_line_anchor says whether an anchor is GitHub's line reference into a file: `L12`, `L12-L20`.
fn is_line_anchor(anchor: &str) -> bool {
    let line =
        |part: &str| part.strip_prefix('L').is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    match anchor.split_once('-') {
        Some((from, to)) => line(from) && line(to),
        None => line(anchor),
    }
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let root = root();
    let files = documents(&root);
    assert!(files.len() > 2, "docs/ holds no markdown file");
    let problems = check(&root, &files);
    assert!(problems.is_empty(), "broken links in the documentation:\n  {}", problems.join("\n  "));
}

/// Fixture is a throwaway directory of markdown files, removed when dropped.
struct Fixture(PathBuf);

impl Fixture {
    fn new(name: &str, files: &[(&str, &str)]) -> Fixture {
        let dir = std::env::temp_dir().join(format!("assetflow-docs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let full = dir.join(path);
            fs::create_dir_all(full.parent().expect("a fixture file has a directory")).expect("fixture directory");
            fs::write(full, text).expect("fixture file");
        }
        Fixture(dir)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_missing_file_and_a_missing_anchor_are_reported_with_their_file_and_line() {
    let fixture = Fixture::new(
        "broken",
        &[
            (
                "README.md",
                "# Front door\n\nSee [the guide](docs/guide.md), [its setup](docs/guide.md#setup) and\n\
                 [a second look](docs/guide.md#setup-1).\n\n\
                 A [missing file](docs/missing.md) and a [missing anchor](docs/guide.md#no-such-heading).\n\
                 A [wrapped\nlink](docs/gone.md) and [here](#front-door), [not here](#back-door).\n",
            ),
            (
                "docs/guide.md",
                "# Guide\n\n## Setup\n\n## Setup\n\nBack to [the front](../README.md#front-door), \
                 [nowhere](../nowhere.md).\n",
            ),
        ],
    );
    let files = [PathBuf::from("README.md"), PathBuf::from("docs/guide.md")];
    let problems = check(&fixture.0, &files);
    assert_eq!(
        problems,
        [
            "README.md:6: docs/missing.md: docs/missing.md does not exist",
            "README.md:6: docs/guide.md#no-such-heading: docs/guide.md has no heading #no-such-heading",
            "README.md:8: docs/gone.md: docs/gone.md does not exist",
            "README.md:8: #back-door: README.md has no heading #back-door",
            "docs/guide.md:7: ../nowhere.md: nowhere.md does not exist",
        ]
    );
}

#[test]
fn links_in_code_and_to_other_sites_are_not_followed() {
    let fixture = Fixture::new(
        "code",
        &[
            (
                "README.md",
                "# Title\n\n```sh\nsee [x](missing.md)\n```\n\n  ~~~\n  [y](missing.md#a)\n  ~~~\n\n\
             Inline `[z](missing.md)` and ``a `[w](missing.md)` b``, [web](https://example.com/x.md#y),\n\
             [mail](mailto:ops@example.com), [dir](.), [line](run.sh#L3-L4).\n\n\
             [ref]: missing-ref.md\n",
            ),
            ("run.sh", "#!/bin/sh\n"),
        ],
    );
    let problems = check(&fixture.0, &[PathBuf::from("README.md")]);
    assert_eq!(problems, ["README.md:14: missing-ref.md: missing-ref.md does not exist"]);
}

#[test]
fn headings_are_slugged_as_github_slugs_them() {
    let markdown = "# Delivery and receipts (SHA-256)\n\
                    ## Worker definitions (`workers/`)\n\
                    ## Check last night's runs\n\
                    ### order sent → purchase handled\n\
                    ## [`ops/RUNBOOK.md`](ops/RUNBOOK.md) links\n\
                    ## assetflow_messages_total\n\
                    ## Setup ##\n\
                    ## Setup\n\
                    ## Setup-1\n\
                    Underlined\n\
                    ==========\n\
                    ```\n\
                    # not a heading\n\
                    ```\n\
                    <a name=\"custom\"></a>\n";
    let expected = [
        "delivery-and-receipts-sha-256",
        "worker-definitions-workers",
        "check-last-nights-runs",
        "order-sent--purchase-handled",
        "opsrunbookmd-links",
        "assetflow_messages_total",
        "setup",
        "setup-1",
        "setup-1-1",
        "underlined",
        "custom",
    ];
    assert_eq!(anchors(markdown), expected.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
}
