//! Ansible inventories (INI and YAML, JSON being YAML) as the host list, so a team that
//! already describes its servers for Ansible does not describe them twice.
//!
//! Read: groups with their hosts, `[group:vars]` / `vars:`, `[group:children]` / `children:`,
//! host variables on the host line or under the host, and host ranges
//! (`web[01:04].example.com`, `db[a:c]`; at most `MAX_HOSTS` hosts in all). Used: `ansible_host` (an IP
//! or a DNS name, resolved here), `ansible_port`, `ansible_user`,
//! `ansible_ssh_private_key_file`, and `cutover_root` for the
//! host's root directory. Variables merge as Ansible merges them: `all`, then groups from the
//! outermost to the innermost (siblings by `ansible_group_priority`, default 1, the higher
//! applied later so it wins, then by name), then the host's own. Only then are the older
//! aliases (`ansible_ssh_host`, `ansible_ssh_port`, `ansible_ssh_user`,
//! `ansible_private_key_file`) weighed, the way Ansible's ssh plugin weighs them: see `to_host`.
//! A YAML null is not set, as in Ansible; a variable cutover reads must be a plain value, so a
//! tagged one (`!unsafe`, `!vault`), a list or a map there is refused, not read as "".
//!
//! Only the inventory file is read: a `group_vars/` or `host_vars/` directory next to it, which
//! Ansible would also read, is refused rather than silently ignored.
//!
//! `hosts_group` picks a group and its children; hosts keep the order in which the file first
//! names them, so batches follow the file. Errors carry the file and line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::config::{Host, Name};

type Vars = BTreeMap<String, Var>;

/// A variable's value and the line it was written on (0 if unknown), so a bad value set in
/// `[web:vars]` is reported where it was written and not at each host it reaches.
#[derive(Debug, Clone)]
struct Var {
    value: Value,
    line: usize,
}

#[derive(Debug, Clone)]
enum Value {
    Text(String),
    /// YAML's null (`~`, `null`, nothing after the colon): as in Ansible, the variable counts
    /// as not set, though like any value it hides what an outer group set.
    Null,
    /// What cutover cannot read as text (a tagged value, a list, a map), and why, as the
    /// end of a sentence naming the variable. Fine in a variable cutover does not read (an
    /// `ntp_servers` list); an error, on its line, in one it does.
    Unreadable(String),
}

impl Var {
    fn text(value: String, line: usize) -> Var {
        Var {
            value: Value::Text(value),
            line,
        }
    }
}

/// What an inventory says, before a group is picked.
#[derive(Debug, Default)]
struct Inventory {
    /// Hosts in the order they first appear, with their own vars and the line they first
    /// appear on (in YAML, the host's key; 0 if unknown).
    hosts: Vec<(String, Vars, usize)>,
    /// Where each host is in `hosts`, so adding one is a lookup and not a scan: with the scan,
    /// a `w[1:20000]` range took minutes.
    index: HashMap<String, usize>,
    groups: BTreeMap<String, Group>,
    /// Host names the lines have produced so far, repeats included (see `MAX_NAMED`).
    named: usize,
}

#[derive(Debug, Default)]
struct Group {
    /// The hosts placed directly in the group; their order is `Inventory::hosts`'.
    hosts: HashSet<String>,
    children: Vec<String>,
    vars: Vars,
}

impl Inventory {
    fn group(&mut self, name: &str) -> &mut Group {
        self.groups.entry(name.to_string()).or_default()
    }

    /// Adds the hosts `pattern` names to `group`, each with `vars`, within the inventory's
    /// limits: the range is counted before it is expanded, each new host as it is added.
    fn add_hosts(
        &mut self,
        group: &str,
        pattern: &HostPattern,
        vars: &Vars,
        line: usize,
    ) -> Result<(), String> {
        self.named += pattern.len;
        if self.named > MAX_NAMED {
            return Err(format!(
                "too many hosts: the inventory's lines name more than {MAX_NAMED} hosts in all \
                 (a host counts each time a line or range names it): list each host once per \
                 group, or split the fleet into several inventories (one config each)"
            ));
        }
        for name in pattern.names() {
            Name::parse(&name).map_err(|m| format!("host {m}{}", port_hint(&name)))?;
            match self.index.get(&name) {
                Some(&i) => self.hosts[i].1.extend(vars.clone()),
                None => {
                    if self.hosts.len() == MAX_HOSTS {
                        return Err(format!(
                            "too many hosts: the inventory names more than {MAX_HOSTS} hosts, \
                             the most cutover reads from one inventory: split the fleet into \
                             several inventories (one config each), or check the ranges"
                        ));
                    }
                    self.index.insert(name.clone(), self.hosts.len());
                    self.hosts.push((name.clone(), vars.clone(), line));
                }
            }
            self.group(group).hosts.insert(name);
        }
        Ok(())
    }

    /// Makes `ungrouped` what Ansible makes it once the file is read: the hosts in no group
    /// but `all`, and always defined (perhaps empty). The INI parser puts every host before
    /// the first section in `ungrouped`, even one a later `[web]` also lists, and YAML puts
    /// `all: hosts:` in `all`: without this, `hosts_group = "ungrouped"` deployed hosts
    /// Ansible counts as grouped, and was "no group" when every host has a group.
    fn reconcile_ungrouped(&mut self) {
        let grouped: HashSet<&str> = self
            .groups
            .iter()
            .filter(|(g, _)| !matches!(g.as_str(), "all" | "ungrouped"))
            .flat_map(|(_, body)| body.hosts.iter().map(String::as_str))
            .collect();
        let ungrouped: HashSet<String> = self
            .hosts
            .iter()
            .map(|(name, _, _)| name)
            .filter(|name| !grouped.contains(name.as_str()))
            .cloned()
            .collect();
        self.group("ungrouped").hosts = ungrouped;
    }
}

/// Reads the hosts of `group` (all hosts when None) from an Ansible inventory file.
pub fn load(path: &Path, group: Option<&str>) -> anyhow::Result<Vec<Host>> {
    // Bounded, as the config is: 64 MiB is hundreds of thousands of hosts.
    const MAX_INVENTORY_BYTES: u64 = 64 << 20;
    let text = crate::config::read_at_most(path, MAX_INVENTORY_BYTES)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the inventory: {e}", path.display()))?;
    if text.len() as u64 > MAX_INVENTORY_BYTES {
        anyhow::bail!(
            "{}: the inventory is larger than 64 MiB: is this the right file?",
            path.display()
        );
    }
    refuse_vars_dirs(path)?;
    // JSON is YAML, and Ansible's YAML plugin reads `.json` inventories too.
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml" | "json")
    ) || looks_like_yaml(&text);
    let inv = if yaml {
        parse_yaml(path, &text)?
    } else {
        parse_ini(path, &text)?
    };
    let mut inv = inv;
    inv.reconcile_ungrouped();
    let base = path.parent().unwrap_or(Path::new("."));
    resolve(path, base, &inv, group)
}

/// Ansible also reads `group_vars/` and `host_vars/` next to the inventory; cutover does not,
/// so a fleet whose user, port or root lives there would be deployed with the wrong ones.
/// Refuses such a directory when it holds any file (hidden ones, like `.gitkeep`, aside).
fn refuse_vars_dirs(path: &Path) -> anyhow::Result<()> {
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    for name in ["group_vars", "host_vars"] {
        let dir = base.join(name);
        if dir.is_dir() && holds_a_file(&dir, 8) {
            anyhow::bail!(
                "{}: Ansible reads variables from this directory, but cutover reads only the \
                 inventory file {}, so hosts would get the wrong user, port or root: move the \
                 variables into the inventory ([group:vars] sections and key=value on host \
                 lines in INI, vars: in YAML), or remove {}",
                dir.display(),
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Whether `dir` holds a file not starting with '.', looking `depth` directories down.
fn holds_a_file(dir: &Path, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            false
        } else if path.is_dir() {
            depth > 0 && holds_a_file(&path, depth - 1)
        } else {
            true
        }
    })
}

/// A file whose first meaningful line is `key:` (and not `[section]`) is YAML, and so is one
/// that opens with `{`: JSON, which is YAML too (no INI line starts with `{`). A trailing
/// comment (`all:   # production servers`) does not count: it is common at the top of a file.
fn looks_like_yaml(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(strip_comment)
        .is_some_and(|l| {
            l == "---" || l.starts_with('{') || (!l.starts_with('[') && l.ends_with(':'))
        })
}

/// The line up to a `#` comment that starts it or follows whitespace (as in YAML and in
/// Ansible's INI), trimmed. A `#` inside a word (`web#1`) is not a comment.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return line[..i].trim();
        }
        prev_space = c.is_whitespace();
    }
    line.trim()
}

/// Parses Ansible's INI format.
fn parse_ini(path: &Path, text: &str) -> anyhow::Result<Inventory> {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Hosts,
        Vars,
        Children,
    }
    let mut inv = Inventory::default();
    let mut section = ("ungrouped".to_string(), Kind::Hosts);
    let err = |line: usize, msg: String| anyhow::anyhow!("{}:{line}: {msg}", path.display());
    // Ansible refuses a group that is only ever named, never defined: a typo such as `dbb`
    // under `[app:children]` would otherwise quietly drop db's hosts from the deploy. A group
    // is defined by a `[name]` or `[name:children]` section anywhere in the file (so a child
    // may be defined after the line naming it), and `all` and `ungrouped` always exist. The
    // references are checked once the whole file is read.
    let mut defined: HashSet<String> = ["all", "ungrouped"].map(String::from).into();
    // (line, group named, the section naming it) in file order.
    let mut named: Vec<(usize, String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some((head, after)) = rest.split_once(']') else {
                return Err(err(
                    n,
                    format!("{line:?}: a section header needs a closing ']', e.g. [web]"),
                ));
            };
            let head = head.trim();
            // Only a comment may follow, as in Ansible: anything else is a mistake (a host
            // on the header's line, a stray `]`) that would otherwise be dropped unseen.
            if !strip_comment(after).is_empty() {
                return Err(err(
                    n,
                    format!(
                        "{line:?}: unexpected {:?} after the section header: put [{head}] alone \
                         on its line (a comment after it starts with #)",
                        after.trim()
                    ),
                ));
            }
            let (name, kind) = match head.split_once(':') {
                None => (head, Kind::Hosts),
                Some((g, "vars")) => (g, Kind::Vars),
                Some((g, "children")) => (g, Kind::Children),
                Some((_, other)) => {
                    return Err(err(
                        n,
                        format!(
                            "[{head}]: unknown section kind {other:?}: use [group], [group:vars] or [group:children]"
                        ),
                    ));
                }
            };
            check_group(name).map_err(|m| err(n, m))?;
            inv.group(name);
            if kind == Kind::Vars {
                named.push((n, name.to_string(), format!("[{name}:vars]")));
            } else {
                defined.insert(name.to_string());
            }
            section = (name.to_string(), kind);
            continue;
        }
        let group = section.0.clone();
        match section.1 {
            Kind::Vars => {
                let (k, v) = key_value(line).map_err(|m| err(n, m))?;
                inv.group(&group).vars.insert(k, Var::text(v, n));
            }
            Kind::Children => {
                // `web   # the web tier`: Ansible allows a comment after the name.
                let child = strip_comment(line);
                if child.contains(char::is_whitespace) || child.contains('=') {
                    return Err(err(
                        n,
                        format!(
                            "{line:?}: a [{group}:children] section lists one group name per line"
                        ),
                    ));
                }
                let line = child;
                check_group(line).map_err(|m| err(n, m))?;
                named.push((n, line.to_string(), format!("[{group}:children]")));
                inv.group(line);
                let g = inv.group(&group);
                if !g.children.iter().any(|c| c == line) {
                    g.children.push(line.to_string());
                }
            }
            Kind::Hosts => {
                let mut words = split_words(line).map_err(|m| err(n, m))?.into_iter();
                let pattern = words.next().unwrap_or_default();
                if pattern.contains('=') {
                    return Err(err(
                        n,
                        format!(
                            "{line:?}: a host line starts with the host name, then key=value variables"
                        ),
                    ));
                }
                let names = HostPattern::parse(&pattern).map_err(|m| err(n, m))?;
                // The name before the variables: in `web1;touch /tmp/pwned`, the name is what
                // is wrong, not `/tmp/pwned`. (Every name is checked as it is added; the
                // first carries the pattern's text, which is where a bad character would be.)
                if let Some(first) = names.names().next() {
                    Name::parse(&first)
                        .map_err(|m| err(n, format!("host {m}{}", port_hint(&first))))?;
                }
                let mut vars = Vars::new();
                for w in words {
                    let (k, v) = key_and_value(&w).map_err(|m| err(n, m))?;
                    vars.insert(k, Var::text(v, n));
                }
                inv.add_hosts(&group, &names, &vars, n)
                    .map_err(|m| err(n, m))?;
            }
        }
    }
    if let Some((n, name, by)) = named.iter().find(|(_, name, _)| !defined.contains(name)) {
        let what = if by.ends_with(":vars]") {
            "sets variables for"
        } else {
            "includes"
        };
        return Err(err(
            *n,
            format!(
                "{by} {what} group {name:?}, which the inventory never defines: \
                 add a [{name}] section (its hosts) or [{name}:children], or fix the name{}",
                did_you_mean(name, &defined)
            ),
        ));
    }
    Ok(inv)
}

/// `" (did you mean \"db\"?)"` for a name one or two typos away from a defined group, as
/// `dbb` is from `db`; nothing when no group is that close.
fn did_you_mean(name: &str, defined: &HashSet<String>) -> String {
    defined
        .iter()
        .map(|d| (edit_distance(name, d), d))
        // Short names are a typo or two from many others: only suggest what is close.
        .filter(|(dist, _)| *dist <= (name.chars().count() / 3 + 1).min(2))
        .min()
        .map_or_else(String::new, |(_, d)| format!(" (did you mean {d:?}?)"))
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn check_group(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{name:?} is not a group name: use letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// `key=value` of a `[group:vars]` line, the value unquoted.
fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = key_and_value(s)?;
    let v = v.trim();
    let v = match split_words(v)?.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        _ => v.to_string(),
    };
    Ok((k, v))
}

/// `key=value` of a word of a host line, which [`split_words`] unquoted already: a quote
/// left in the value is a character of it (`cutover_root="/srv/it's"`), as in Ansible.
fn key_and_value(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("{s:?} is not a variable: write key=value"));
    };
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{k:?} is not a variable name"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Splits on whitespace outside quotes; quotes are removed. A `#` starting a word ends the line.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None if c == '#' && !in_word => break,
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unclosed {q} quote in {line:?}"));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// The most hosts one inventory may hold. Ranges make a short file name many hosts (30 lines
/// of `h[0:99999]` are three million), so the count is checked as hosts are added, and a
/// range's size before it is expanded: memory stays bounded whatever the file says.
const MAX_HOSTS: usize = 100_000;

/// The most host names an inventory's lines may produce in all, a host counting each time a
/// line or range names it: the same range repeated under many groups (or many times in one)
/// adds no host but costs memory and time for each name.
const MAX_NAMED: usize = 1_000_000;

/// A host pattern, `web[01:03].x`, read but not expanded: how many hosts it names is known
/// before any name is made.
#[derive(Debug)]
struct HostPattern {
    parts: Vec<Part>,
    /// How many names the pattern makes: the product of its ranges' lengths.
    len: usize,
}

#[derive(Debug)]
enum Part {
    Text(String),
    /// `[start:end:step]`; `width` > 0 zero-pads each number to that many digits.
    Numbers {
        start: u64,
        step: u64,
        width: usize,
        len: usize,
    },
    /// `[a:f:step]`, as indexes into `LETTERS`.
    Letters {
        start: usize,
        step: usize,
        len: usize,
    },
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Text(_) => 1,
            Part::Numbers { len, .. } | Part::Letters { len, .. } => *len,
        }
    }

    fn push(&self, i: usize, out: &mut String) {
        match self {
            Part::Text(t) => out.push_str(t),
            // i < len, so start + i * step <= end: no overflow.
            Part::Numbers {
                start, step, width, ..
            } => out.push_str(&format!("{:0width$}", start + i as u64 * step)),
            Part::Letters { start, step, .. } => out.push(char::from(LETTERS[start + i * step])),
        }
    }
}

impl HostPattern {
    /// `web[01:03].x` → web01.x, web02.x, web03.x; `db[a:c]` → dba, dbb, dbc (see
    /// `parse_range`). Ranges multiply, the last varying fastest, as Ansible expands them.
    fn parse(pattern: &str) -> Result<HostPattern, String> {
        let mut parts = Vec::new();
        let mut len: usize = 1;
        let mut rest = pattern;
        while let Some(open) = rest.find('[') {
            let Some(close) = rest[open..].find(']').map(|c| open + c) else {
                return Err(format!("{pattern:?}: unclosed '[' in a host range"));
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let part = parse_range(pattern, &rest[open + 1..close])?;
            len = len
                .checked_mul(part.len())
                .filter(|n| *n <= MAX_HOSTS)
                .ok_or_else(|| {
                    format!(
                        "{pattern:?}: too many hosts: the range names more than {MAX_HOSTS}, the \
                         most cutover reads from one inventory: check the range, or split the \
                         fleet into several inventories (one config each)"
                    )
                })?;
            parts.push(part);
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(HostPattern { parts, len })
    }

    /// The names, one at a time.
    fn names(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.len).map(|mut i| {
            // The digits of i in the mixed radix of the parts' lengths, the last part lowest.
            let mut at = vec![0; self.parts.len()];
            for (k, part) in self.parts.iter().enumerate().rev() {
                at[k] = i % part.len();
                i /= part.len();
            }
            let mut name = String::new();
            for (part, i) in self.parts.iter().zip(at) {
                part.push(i, &mut name);
            }
            name
        })
    }
}

/// The letters a letter range runs through, in Ansible's order (`string.ascii_letters`):
/// `[x:B]` is x, y, z, A, B.
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The inside of one `[...]` of `pattern`, as Ansible reads it: `start:end` or
/// `start:end:step`, between two numbers or two single letters; an empty start is 0. A start
/// written with leading zeros pads every number to its width, so the end must be as wide.
fn parse_range(pattern: &str, inner: &str) -> Result<Part, String> {
    let fail = |why: String| Err(format!("{pattern:?}: [{inner}]: {why}"));
    let (a, b, step) = match inner.split(':').collect::<Vec<_>>().as_slice() {
        [a, b] => (*a, *b, "1"),
        [a, b, s] => (*a, *b, *s),
        _ => {
            return fail(
                "a host range is [start:end] or [start:end:step], e.g. web[01:10] or \
                 web[1:9:2]"
                    .into(),
            );
        }
    };
    let a = if a.is_empty() { "0" } else { a };
    if b.is_empty() {
        return fail(format!("a host range needs an end, e.g. [{a}:9]"));
    }
    let Some(step) = step.parse::<u64>().ok().filter(|s| *s >= 1) else {
        return fail(format!(
            "the step {step:?} is not a whole number of at least 1"
        ));
    };
    let backwards = || fail(format!("the range runs backwards: write it [{b}:{a}]"));
    let letter = |s: &str| match s.as_bytes() {
        [c] => LETTERS.iter().position(|l| l == c),
        _ => None,
    };
    if let (Some(start), Some(end)) = (letter(a), letter(b)) {
        if start > end {
            return backwards();
        }
        let step = usize::try_from(step).unwrap_or(usize::MAX);
        return Ok(Part::Letters {
            start,
            step,
            len: (end - start) / step + 1,
        });
    }
    let (Ok(start), Ok(end)) = (a.parse::<u64>(), b.parse::<u64>()) else {
        return fail(
            "a host range runs between two numbers (web[01:10]) or two letters (web[a:f])".into(),
        );
    };
    let width = if a.starts_with('0') && a.len() > 1 {
        a.len()
    } else {
        0
    };
    if width > 0 && b.len() != width {
        // Ansible refuses it too ("equal-length begin and end formats").
        let w = width.max(b.len());
        return fail(format!(
            "{a} is zero-padded to {width} digits but {b} has {}: write both ends with as \
             many digits, e.g. [{a:0>w$}:{b:0>w$}]",
            b.len()
        ));
    }
    if start > end {
        return backwards();
    }
    // Past MAX_HOSTS the exact length does not matter: the pattern is refused.
    let len = usize::try_from((end - start) / step)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    Ok(Part::Numbers {
        start,
        step,
        width,
        len,
    })
}

/// A map that keeps the file's order, with the line of each key (0 when unknown), so errors
/// about a group or host can point at it.
struct Ordered<V>(Vec<(String, usize, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<serde_saphyr::Spanned<String>, V>()? {
                    out.push((k.value, k.referenced.line() as usize, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_any(V2(std::marker::PhantomData))
    }
}

/// A YAML variable's value: a scalar as Ansible would print it, null, or something else.
/// Lists and maps (`ntp_servers: [a, b]`) are common in inventories and mean nothing to
/// cutover, which reads only `ansible_*` connection variables and `cutover_root`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Null,
    /// A map, or a value with a tag of its own: serde_saphyr hands `!unsafe x` to an untagged
    /// enum as the map `{unsafe: x}`.
    Map(BTreeMap<String, serde::de::IgnoredAny>),
    Other(serde::de::IgnoredAny),
}

impl Scalar {
    /// `text` is the file and `line` the variable's, where a tag would be written (or on the
    /// line after, for `key:` and the value below it).
    fn value(self, text: &str, line: usize) -> Value {
        let tag = |m: &BTreeMap<String, serde::de::IgnoredAny>| match m.keys().next() {
            Some(k) if m.len() == 1 && line > 0 => {
                let tag = format!("!{k}");
                text.lines()
                    .skip(line - 1)
                    .take(2)
                    .any(|l| l.contains(&tag))
                    .then_some(tag)
            }
            _ => None,
        };
        match self {
            Scalar::Bool(b) => Value::Text(b.to_string()),
            Scalar::Int(i) => Value::Text(i.to_string()),
            Scalar::Float(f) => Value::Text(f.to_string()),
            Scalar::Str(s) => Value::Text(s),
            Scalar::Null => Value::Null,
            Scalar::Map(m) => Value::Unreadable(match tag(&m).as_deref() {
                Some("!vault") => "is encrypted (!vault), which cutover cannot decrypt: write \
                                   it in plain text"
                    .into(),
                Some(tag) => format!(
                    "is tagged {tag}, which cutover does not read: remove the tag (cutover \
                     never templates, so it reads the value as written without it)"
                ),
                None => "is a map: write a single value".into(),
            }),
            Scalar::Other(_) => {
                Value::Unreadable("is a list or a map: write a single value".into())
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct YamlGroup {
    hosts: Option<Ordered<Option<Ordered<Scalar>>>>,
    vars: Option<Ordered<Scalar>>,
    children: Option<Ordered<Option<YamlGroup>>>,
}

/// Parses Ansible's YAML format (`all:` → `hosts`, `vars`, `children`).
fn parse_yaml(path: &Path, text: &str) -> anyhow::Result<Inventory> {
    let top: Ordered<Option<YamlGroup>> = serde_saphyr::from_str(text).map_err(|e| {
        // The library's own message ends "set DuplicateKeyPolicy in Options if acceptable",
        // advice for its callers, not for whoever wrote the inventory.
        if let serde_saphyr::Error::DuplicateMappingKey { key, location } = e.without_snippet() {
            let what = key
                .as_ref()
                .map_or_else(|| "a key".to_string(), |k| format!("{k:?}"));
            return anyhow::anyhow!(
                "{}:{}: {what} is written twice in the same mapping (a group, host or variable \
                 named twice): Ansible would keep only the last one; merge the two into one",
                path.display(),
                location.line()
            );
        }
        // `ansible-inventory --list` prints a script inventory's JSON, whose `_meta` and
        // lists of hosts are not the YAML plugin's format.
        let hint = if text.contains("\"_meta\"") {
            " (this looks like the output of `ansible-inventory --list`, which cutover does not \
             read: `ansible-inventory --list --yaml` writes the inventory in the format it reads)"
        } else {
            ""
        };
        anyhow::anyhow!("{}: not a valid YAML inventory{hint}: {e}", path.display())
    })?;
    let mut inv = Inventory::default();
    // `file:line` of a key, as the INI errors have it (just the file if the line is unknown).
    let at = |line: usize| {
        if line > 0 {
            format!("{}:{line}", path.display())
        } else {
            path.display().to_string()
        }
    };
    // Depth-first, in the file's order; a loop rather than recursion, so a deeply nested
    // file cannot overflow the stack. Children are pushed in reverse to pop in order.
    let mut todo: Vec<(String, usize, Option<YamlGroup>)> = top.0.into_iter().rev().collect();
    while let Some((name, line, g)) = todo.pop() {
        check_group(&name).map_err(|m| anyhow::anyhow!("{}: {m}", at(line)))?;
        inv.group(&name);
        let Some(g) = g else { continue };
        if let Some(vars) = g.vars {
            for (k, line, v) in vars.0 {
                let value = v.value(text, line);
                inv.group(&name).vars.insert(k, Var { value, line });
            }
        }
        for (pattern, line, vars) in g.hosts.map(|h| h.0).unwrap_or_default() {
            let vars: Vars = vars
                .map(|v| {
                    v.0.into_iter()
                        .map(|(k, line, v)| {
                            let value = v.value(text, line);
                            (k, Var { value, line })
                        })
                        .collect()
                })
                .unwrap_or_default();
            HostPattern::parse(&pattern)
                .and_then(|p| inv.add_hosts(&name, &p, &vars, line))
                .map_err(|m| anyhow::anyhow!("{}: group {name}: {m}", at(line)))?;
        }
        let children = g.children.map(|c| c.0).unwrap_or_default();
        for (child, _, _) in &children {
            let parent = inv.group(&name);
            if !parent.children.contains(child) {
                parent.children.push(child.clone());
            }
        }
        todo.extend(children.into_iter().rev());
    }
    Ok(inv)
}

/// Picks the group, merges variables and turns inventory hosts into cutover hosts.
///
/// Each group's place in the hierarchy is worked out once, and each host's groups from the
/// groups it is placed in, so the work grows with the file and not with hosts × groups.
fn resolve(
    path: &Path,
    base: &Path,
    inv: &Inventory,
    group: Option<&str>,
) -> anyhow::Result<Vec<Host>> {
    let file = path.display();
    // `up`: every group a group is a child of; `parents` the same without `all`, which is
    // every group's parent already: naming a group under `[all:children]` does not make it
    // deeper (for variable precedence) than one left at the top.
    let mut up: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut parents: HashMap<&str, Vec<&str>> = HashMap::new();
    for (g, body) in &inv.groups {
        for c in &body.children {
            if !inv.groups.contains_key(c) {
                anyhow::bail!("{file}: group {g} lists child {c}, which is not defined");
            }
            up.entry(c).or_default().push(g);
            if g != "all" {
                parents.entry(c).or_default().push(g);
            }
        }
    }
    let order = parents_first(inv).map_err(|m| anyhow::anyhow!("{file}: {m}"))?;
    // Depth orders variable precedence.
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for &g in &order {
        let ps = parents.get(g).map_or(&[][..], Vec::as_slice);
        let d = ps.iter().map(|p| depth[p] + 1).max().unwrap_or(0);
        depth.insert(g, d);
    }
    // Among groups at the same depth, Ansible applies the lower `ansible_group_priority`
    // (default 1) first, so the higher one wins; at equal priority, by name.
    let mut priority: HashMap<&str, i64> = HashMap::new();
    for (g, body) in &inv.groups {
        let Some(v) = body.vars.get("ansible_group_priority") else {
            continue;
        };
        let at = if v.line > 0 {
            format!("{file}:{}", v.line)
        } else {
            file.to_string()
        };
        let p = match &v.value {
            Value::Null => continue,
            Value::Unreadable(why) => {
                anyhow::bail!("{at}: group {g}: ansible_group_priority {why}")
            }
            Value::Text(t) => t.trim().parse::<i64>().map_err(|_| {
                anyhow::anyhow!(
                    "{at}: group {g}: ansible_group_priority = {t:?} is not a whole number: \
                     write one such as 10 (among groups at the same depth, the higher wins)"
                )
            })?,
        };
        priority.insert(g.as_str(), p);
    }
    // The groups each host is placed in directly.
    let mut placed: HashMap<&str, Vec<&str>> = HashMap::new();
    for (g, body) in &inv.groups {
        for h in &body.hosts {
            placed.entry(h.as_str()).or_default().push(g.as_str());
        }
    }
    let picked = match group {
        None | Some("all") => None,
        Some(g) => {
            if !inv.groups.contains_key(g) {
                let known: Vec<&str> = inv.groups.keys().map(String::as_str).collect();
                anyhow::bail!(
                    "{file}: no group {g:?} in the inventory (groups: {})",
                    known.join(", ")
                );
            }
            Some(g)
        }
    };
    let mut hosts = Vec::new();
    for (name, own, line) in &inv.hosts {
        // The groups the host belongs to, directly or through children: up from the groups
        // it is placed in, each group once.
        let mut groups: HashSet<&str> = HashSet::new();
        let mut todo: Vec<&str> = placed.get(name.as_str()).cloned().unwrap_or_default();
        while let Some(g) = todo.pop() {
            if groups.insert(g) {
                todo.extend(up.get(g).into_iter().flatten().copied());
            }
        }
        if picked.is_some_and(|p| !groups.contains(p)) {
            continue;
        }
        let mut groups: Vec<(usize, i64, &str)> = groups
            .into_iter()
            .filter(|g| *g != "all")
            .map(|g| (depth[g], priority.get(g).copied().unwrap_or(1), g))
            .collect();
        groups.sort();
        let mut vars = inv
            .groups
            .get("all")
            .map(|g| g.vars.clone())
            .unwrap_or_default();
        for (_, _, g) in groups {
            vars.extend(inv.groups[g].vars.clone());
        }
        vars.extend(own.clone());
        hosts.push(to_host(&file.to_string(), *line, base, name, &vars)?);
    }
    if hosts.is_empty() {
        match group {
            Some(g) => anyhow::bail!("{file}: group {g} has no hosts"),
            None => anyhow::bail!("{file}: the inventory has no hosts"),
        }
    }
    Ok(hosts)
}

/// Every group, each after all the groups it is a child of; groups that include each other
/// are refused. Iterative, so a very deep nesting cannot overflow the stack.
fn parents_first(inv: &Inventory) -> Result<Vec<&str>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Seen {
        OnPath,
        Done,
    }
    let mut seen: HashMap<&str, Seen> = HashMap::new();
    // Children before their parents; reversed at the end.
    let mut order = Vec::with_capacity(inv.groups.len());
    for root in inv.groups.keys() {
        if seen.contains_key(root.as_str()) {
            continue;
        }
        // The path from `root`, with the next child to visit of each group on it.
        let mut path: Vec<(&str, usize)> = vec![(root, 0)];
        seen.insert(root, Seen::OnPath);
        while let Some((g, next)) = path.last_mut() {
            let children = inv
                .groups
                .get(*g)
                .map_or(&[][..], |b| b.children.as_slice());
            match children.get(*next) {
                Some(c) => {
                    *next += 1;
                    match seen.get(c.as_str()) {
                        Some(Seen::Done) => {}
                        Some(Seen::OnPath) => {
                            let mut names: Vec<&str> = path.iter().map(|(p, _)| *p).collect();
                            names.push(c);
                            return Err(format!(
                                "groups include each other: {}",
                                names.join(" -> ")
                            ));
                        }
                        None => {
                            seen.insert(c, Seen::OnPath);
                            path.push((c, 0));
                        }
                    }
                }
                None => {
                    let g = *g;
                    seen.insert(g, Seen::Done);
                    order.push(g);
                    path.pop();
                }
            }
        }
    }
    order.reverse();
    Ok(order)
}

/// `file` and `line` locate the host; an error about a variable names the line the variable
/// was written on (a `[group:vars]` line, say), or the host's when that is unknown.
fn to_host(file: &str, line: usize, base: &Path, name: &str, vars: &Vars) -> anyhow::Result<Host> {
    let at = |l: usize| match (l, line) {
        (0, 0) => file.to_string(),
        (0, l) | (l, _) => format!("{file}:{l}"),
    };
    // Aliases are listed as Ansible's ssh connection plugin lists them (its `vars:` for
    // `host`, `port`, `remote_user`, `private_key_file`), and, as there, the LAST one the
    // merged variables define wins: ansible-core's `ConfigManager._loop_entries`
    // (lib/ansible/config/manager.py) keeps looping after a hit, "last one wins". The merge
    // has already put host vars over group vars, so a group's `ansible_port` does not beat
    // a host's `ansible_ssh_port`; but, as in Ansible, a defined `ansible_ssh_port` beats
    // `ansible_port` whatever level each was set at. A null is not defined there either
    // (`_loop_entries` skips None). Returns the variable's name and line too, for errors.
    let get = |aliases: &[&'static str]| -> anyhow::Result<Option<(&'static str, Set)>> {
        let found = aliases.iter().rev().find_map(|k| {
            let v = vars.get(*k)?;
            match &v.value {
                Value::Null => None,
                Value::Text(t) => Some(Ok((*k, Set(t.clone(), v.line)))),
                Value::Unreadable(why) => Some(Err(anyhow::anyhow!(
                    "{}: host {name}: {k} {why}",
                    at(v.line)
                ))),
            }
        });
        found.transpose()
    };
    // Variables that change how Ansible reaches the host: ignored, cutover would reach it
    // another way (directly, where the inventory says through a bastion). The connection is
    // checked before the address: a container's name need not resolve.
    if let Some((key, Set(v, l))) = get(&["ansible_connection"])? {
        let ssh = [
            "ssh",
            "smart",
            "paramiko",
            "paramiko_ssh",
            "ansible.builtin.ssh",
            "ansible.builtin.paramiko_ssh",
        ];
        if !ssh.contains(&v.as_str()) {
            anyhow::bail!(
                "{}: host {name}: {key} = {v:?}: cutover reaches every host one way, the \
                 config's transport (\"ssh\", or \"local\" for directories on this machine), \
                 and cannot reach one host otherwise: remove {key} (or set it to ssh), or \
                 leave the host out of the group the config deploys (hosts_group)",
                at(l)
            );
        }
    }
    let resolved = match get(&["ansible_host", "ansible_ssh_host"])? {
        Some((key, Set(v, l))) => {
            resolve_address(&v).map_err(|e| anyhow::anyhow!("{}: host {name}: {key} {e}", at(l)))
        }
        // The name stands for the address only for want of an ansible_host: say so, and how
        // to give one (the message read as if ansible_host had been set to the name).
        None => resolve_address(name).map_err(|e| {
            anyhow::anyhow!(
                "{}: host {name}: no ansible_host gives its address, and its name {e}: set \
                 ansible_host=<address> for it (on its line, or `ansible_host: <address>` \
                 under the host in YAML)",
                at(line)
            )
        }),
    };
    // Before the address is required: a host reached through a bastion often has a name
    // only the bastion resolves, and "does not resolve" hid the real cause.
    for key in [
        "ansible_ssh_common_args",
        "ansible_ssh_extra_args",
        "ansible_ssh_args",
    ] {
        if let Some((key, Set(v, l))) = get(&[key])? {
            if !v.trim().is_empty() {
                let host_block = match &resolved {
                    Ok(address) => format!(
                        "under `Host {address}`, the address cutover connects to, e.g. \
                         `ProxyJump bastion`"
                    ),
                    Err(_) => "under `Host <address>`, e.g. `ProxyJump bastion`, and give \
                               the host an ansible_host this machine can resolve (cutover \
                               resolves it here and connects to the address; its name does \
                               not resolve here)"
                        .to_string(),
                };
                anyhow::bail!(
                    "{}: host {name}: {key} = {v:?}: cutover does not pass ssh options from \
                     the inventory, so it would connect without them (directly, say, where \
                     they name a ProxyJump bastion): put them in ~/.ssh/config (or the file \
                     CUTOVER_SSH_CONFIG names) {host_block}, and remove {key}",
                    at(l)
                );
            }
        }
    }
    let address = resolved?;
    let port = match get(&["ansible_port", "ansible_ssh_port"])? {
        Some((key, Set(p, l))) => Some(p.parse::<u16>().map_err(|_| {
            anyhow::anyhow!(
                "{}: host {name}: {key} = {p:?} is not a port number: write one from 1 to 65535",
                at(l)
            )
        })?),
        None => None,
    };
    let user = get(&["ansible_user", "ansible_ssh_user"])?;
    if let Some((key, Set(v, l))) = &user {
        if v.is_empty() || v.starts_with('-') || v.contains(char::is_whitespace) {
            anyhow::bail!(
                "{}: host {name}: {key} = {v:?} is not a user name: write the login \
                 name, not empty, without spaces and not starting with '-'",
                at(*l)
            );
        }
    }
    let user = user.map(|(_, Set(u, _))| u);
    let identity = get(&["ansible_private_key_file", "ansible_ssh_private_key_file"])?
        .map(|(_, Set(p, _))| absolute(base, &p));
    // As written: whether it is a path on this machine (local transport, resolved against
    // the inventory's directory by the config) or on the host (SSH) is the config's call.
    let root = get(&["cutover_root"])?
        .map(|(_, Set(v, _))| PathBuf::from(v))
        .unwrap_or_default();
    Ok(Host {
        name: Name::parse(name)
            .map_err(|m| anyhow::anyhow!("{}: host {m}{}", at(line), port_hint(name)))?,
        address,
        root,
        port,
        user,
        identity,
        origin: Some(at(line)),
    })
}

/// A variable's text and the line that set it.
struct Set(String, usize);

fn absolute(base: &Path, p: &str) -> PathBuf {
    let p = match p.strip_prefix("~/") {
        Some(rest) => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => PathBuf::from(p),
        },
        None => PathBuf::from(p),
    };
    if p.is_absolute() { p } else { base.join(p) }
}

/// An IP as is; a DNS name through the system resolver (first address).
fn resolve_address(target: &str) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = target.parse::<IpAddr>() {
        return Ok(ip);
    }
    let mut addrs = (target, 0u16)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("{target:?} does not resolve ({e})"))?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| anyhow::anyhow!("{target:?} resolves to no address"))
}

/// For `web1:2222`, Ansible's host:port form, which cutover reads from `ansible_port`. A name
/// with more than one colon is an IPv6 address (perhaps mistyped), not host:port: the hint
/// for `2001:db8::1` was to write `2001:db8: ansible_port=1`.
fn port_hint(name: &str) -> String {
    if name.matches(':').count() > 1 {
        return match name.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!(
                " (for an IPv6 address, name the host and give the address: `web1 ansible_host={name}` \
                 in INI or `ansible_host: \"{name}\"` under the host in YAML)"
            ),
            Err(_) => String::new(),
        };
    }
    match name.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => format!(
            " (for a port, write `{host} ansible_port={port}` in INI or `ansible_port: {port}` under the host in YAML)"
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names `pattern` expands to.
    fn expand(pattern: &str) -> Result<Vec<String>, String> {
        HostPattern::parse(pattern).map(|p| p.names().collect())
    }

    #[test]
    fn ranges_expand() {
        assert_eq!(
            expand("web[01:03].x").unwrap(),
            ["web01.x", "web02.x", "web03.x"]
        );
        assert_eq!(expand("db[1:5:2]").unwrap(), ["db1", "db3", "db5"]);
        assert_eq!(
            expand("r[1:2]x[0:1]").unwrap(),
            ["r1x0", "r1x1", "r2x0", "r2x1"]
        );
        assert!(expand("db[5:1]").is_err());
        // Near the integer limit, and ranges that multiply: an error, never a hang.
        assert_eq!(
            expand("w[18446744073709551614:18446744073709551615]").unwrap(),
            ["w18446744073709551614", "w18446744073709551615"]
        );
        assert!(expand("w[0:18446744073709551615]").is_err());
        let e = expand("w[0:99999]x[0:99999]").unwrap_err();
        assert!(
            e.contains("too many hosts") && e.contains("more than 100000"),
            "{e}"
        );
    }

    #[test]
    fn ranges_read_as_ansible_reads_them() {
        // Letters, running on through the capitals as Ansible's do, with a step too.
        assert_eq!(expand("web[a:c]").unwrap(), ["weba", "webb", "webc"]);
        assert_eq!(expand("x[y:B]").unwrap(), ["xy", "xz", "xA", "xB"]);
        assert_eq!(expand("x[a:e:2]").unwrap(), ["xa", "xc", "xe"]);
        // An empty start is 0.
        assert_eq!(expand("web[:2]").unwrap(), ["web0", "web1", "web2"]);
        assert_eq!(expand("web[1:010]").unwrap().len(), 10);
        // Each mistake gets its own message, not "a host range looks like".
        for (pattern, why) in [
            (
                "web[01:100]",
                "[01:100]: 01 is zero-padded to 2 digits but 100 has 3: write both ends with \
                 as many digits, e.g. [001:100]",
            ),
            ("web[001:10]", "e.g. [001:010]"),
            ("web[00:3]", "00 is zero-padded to 2 digits but 3 has 1"),
            ("web[1:]", "[1:]: a host range needs an end, e.g. [1:9]"),
            ("web[c:a]", "the range runs backwards: write it [a:c]"),
            ("web[5:1]", "the range runs backwards: write it [1:5]"),
            (
                "web[a:9]",
                "two numbers (web[01:10]) or two letters (web[a:f])",
            ),
            (
                "web[aa:b]",
                "two numbers (web[01:10]) or two letters (web[a:f])",
            ),
            (
                "web[1:5:0]",
                "the step \"0\" is not a whole number of at least 1",
            ),
            ("web[1]", "a host range is [start:end] or [start:end:step]"),
        ] {
            let e = expand(pattern).unwrap_err();
            assert!(
                e.starts_with(&format!("{pattern:?}: ")) && e.contains(why),
                "{pattern} -> {e}"
            );
        }
        // Through a file, as hosts.
        let hosts = ini("[web]\nweb[a:b] ansible_host=127.0.120.1\n", None).unwrap();
        assert_eq!(names(&hosts), ["weba", "webb"]);
    }

    #[test]
    fn an_inventory_holds_at_most_100000_hosts() {
        // The review's file: 30 ranges of 100,000 took 3.9 GB and 31 s before an error. Now
        // the host past the limit stops it, on its line.
        let mut text = String::from("[web]\n");
        for i in 0..30 {
            text.push_str(&format!("h{i}-[0:99999] ansible_host=127.0.120.1\n"));
        }
        let e = format!("{:#}", ini(&text, None).unwrap_err());
        assert!(
            e.contains("hosts.ini:3: too many hosts: the inventory names more than 100000"),
            "{e}"
        );
        // One range past the limit is refused before it is expanded.
        let e = format!("{:#}", ini("[web]\nweb[0:100000]\n", None).unwrap_err());
        assert!(
            e.contains("hosts.ini:2: \"web[0:100000]\": too many hosts"),
            "{e}"
        );
        // Listing the same hosts again adds none, but every name costs: bounded too.
        let mut text = String::from("[web]\n");
        for i in 0..11 {
            text.push_str(&format!("[g{i}]\nh[0:99999]\n"));
        }
        let e = format!("{:#}", ini(&text, None).unwrap_err());
        assert!(
            e.contains(
                "hosts.ini:23: too many hosts: the inventory's lines name more than 1000000"
            ),
            "{e}"
        );
        // YAML counts the same way.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        std::fs::write(&p, "all:\n  hosts:\n    a[0:59999]:\n    b[0:59999]:\n").unwrap();
        let e = format!("{:#}", load(&p, None).unwrap_err());
        assert!(e.contains("hosts.yml:4: group all: too many hosts"), "{e}");
    }

    #[test]
    fn groups_listed_under_all_children_are_no_deeper_than_the_others() {
        // Ansible: alpha and zeta are both children of `all`, so at equal depth the later
        // name (zeta) wins, whether or not alpha is listed under [all:children].
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.ini");
        std::fs::write(
            &p,
            "[all:children]\nalpha\n\n[alpha]\nh1 ansible_host=127.0.0.1\n\n[alpha:vars]\nansible_port=2201\n\n\
             [zeta]\nh1\n\n[zeta:vars]\nansible_port=2299\n",
        )
        .unwrap();
        let hosts = load(&p, None).unwrap();
        assert_eq!(hosts[0].port, Some(2299));
    }

    #[test]
    fn host_port_form_gets_a_hint() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.ini");
        std::fs::write(&p, "[web]\nweb1:2222 ansible_host=127.0.0.1\n").unwrap();
        let e = format!("{:#}", load(&p, None).unwrap_err());
        assert!(e.contains("hosts.ini:2"), "{e}");
        assert!(e.contains("write `web1 ansible_port=2222`"), "{e}");
    }

    #[test]
    fn ipv6_host_names_get_no_port_hint() {
        let e = format!("{:#}", ini("[web]\n2001:db8::1\n", None).unwrap_err());
        assert!(e.contains("hosts.ini:2"), "{e}");
        assert!(!e.contains("ansible_port"), "{e}");
        assert!(e.contains("`web1 ansible_host=2001:db8::1`"), "{e}");
        // Not an address either: no hint at all.
        let e = format!("{:#}", ini("[web]\nfe80::zz:1\n", None).unwrap_err());
        assert!(!e.contains("ansible_port") && !e.contains("(for"), "{e}");
    }

    #[test]
    fn a_bad_variable_is_reported_on_the_line_that_sets_it() {
        // Set in [web:vars] on line 4, not on the host's line 2.
        for (vars, what) in [
            (
                "ansible_port=abc",
                "ansible_port = \"abc\" is not a port number",
            ),
            ("ansible_user=", "ansible_user = \"\" is not a user name"),
            (
                "ansible_host=no-such-host.invalid",
                "ansible_host \"no-such-host.invalid\" does not resolve",
            ),
        ] {
            let text = format!("[web]\nw1 ansible_host=127.0.0.1\n[web:vars]\n{vars}\n");
            let text = if vars.starts_with("ansible_host") {
                text.replace("w1 ansible_host=127.0.0.1", "w1")
            } else {
                text
            };
            let e = format!("{:#}", ini(&text, None).unwrap_err());
            assert!(
                e.contains("hosts.ini:4: host w1: ") && e.contains(what),
                "{e}"
            );
        }
        // On a second line naming the host: that line, not the first.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n[db]\nw1 ansible_port=99999\n",
                None
            )
            .unwrap_err()
        );
        assert!(e.contains("hosts.ini:4: host w1: ansible_port"), "{e}");
    }

    #[test]
    fn words_and_quotes() {
        assert_eq!(
            split_words("web1 a=1 b=\"two words\" # comment").unwrap(),
            ["web1", "a=1", "b=two words"]
        );
        assert!(split_words("web1 a=\"open").is_err());
    }

    /// A review found `cutover_root="/tmp/x it's y"` refused ("unclosed ' quote"): the value,
    /// unquoted once, was split again. Ansible (shlex) takes it.
    #[test]
    fn a_quote_inside_another_kind_of_quote_is_data() {
        let hosts = ini(
            "[web]\nweb1 ansible_host=127.0.0.21 cutover_root=\"/tmp/x it's y\"\n",
            Some("web"),
        )
        .unwrap();
        assert_eq!(hosts[0].root, std::path::Path::new("/tmp/x it's y"));
    }

    /// Writes `text` as an INI inventory and loads `group` from it.
    fn ini(text: &str, group: Option<&str>) -> anyhow::Result<Vec<Host>> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.ini");
        std::fs::write(&p, text).unwrap();
        load(&p, group)
    }

    fn names(hosts: &[Host]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn a_group_named_but_never_defined_is_refused_with_its_line() {
        // `dbb` is a typo for `db`: accepting it would quietly leave db1 out of `app`.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n[db]\nd1 ansible_host=127.0.0.1\n\n\
                 [app:children]\nweb\ndbb\n",
                Some("app"),
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:8: [app:children] includes group \"dbb\""),
            "{e}"
        );
        assert!(
            e.contains("add a [dbb] section") && e.contains("fix the name"),
            "{e}"
        );
        assert!(e.contains("did you mean \"db\"?"), "{e}");
        // Variables for a group that has no section of its own.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n\n[wbe:vars]\nansible_port=2201\n",
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:4: [wbe:vars] sets variables for group \"wbe\""),
            "{e}"
        );
        assert!(e.contains("did you mean \"web\"?"), "{e}");
        // Far from every group: no guess.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n[app:children]\nx\n",
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:4:") && !e.contains("did you mean"),
            "{e}"
        );
    }

    #[test]
    fn groups_may_be_defined_after_the_line_that_names_them() {
        // db is named as a child and given vars before its [db:children] section, and
        // dbmain before its [dbmain] section; `all` and `ungrouped` need no section.
        let hosts = ini(
            "solo ansible_host=127.0.0.1\n[all:vars]\nansible_user=deploy\n\
             [ungrouped:vars]\nansible_port=2200\n\
             [app:children]\nweb\ndb\n[db:vars]\nansible_port=2202\n\
             [web]\nw1 ansible_host=127.0.0.1\n[db:children]\ndbmain\n\
             [dbmain]\nd1 ansible_host=127.0.0.1\n[empty]\n[app2:children]\nempty\n",
            Some("app"),
        )
        .unwrap();
        assert_eq!(names(&hosts), ["w1", "d1"]);
        assert_eq!(hosts[1].port, Some(2202));
        let all = ini(
            "solo ansible_host=127.0.0.1\n[ungrouped:vars]\nansible_port=2200\n",
            None,
        )
        .unwrap();
        assert_eq!(all[0].port, Some(2200));
    }

    #[test]
    fn ungrouped_is_the_hosts_in_no_other_group_and_always_exists() {
        // As in Ansible: h1 is in web, so only h2 is ungrouped, and only h2 gets its vars.
        let text = "h1 ansible_host=127.0.0.1\nh2 ansible_host=127.0.0.1\n[web]\nh1\n\
                    [ungrouped:vars]\nansible_port=2200\n";
        let hosts = ini(text, Some("ungrouped")).unwrap();
        assert_eq!(names(&hosts), ["h2"]);
        let all = ini(text, None).unwrap();
        assert_eq!(names(&all), ["h1", "h2"]);
        assert_eq!(all[0].port, None);
        assert_eq!(all[1].port, Some(2200));
        // YAML: hosts right under `all` are ungrouped too, unless a group lists them.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        std::fs::write(
            &p,
            "all:\n  hosts:\n    h1:\n      ansible_host: 127.0.0.1\n    h2:\n      ansible_host: 127.0.0.1\n\
             \x20 children:\n    web:\n      hosts:\n        h1:\n",
        )
        .unwrap();
        assert_eq!(names(&load(&p, Some("ungrouped")).unwrap()), ["h2"]);
        // Every host has a group: ungrouped exists and is empty, not unknown.
        let e = format!(
            "{:#}",
            ini("[web]\nh1 ansible_host=127.0.0.1\n", Some("ungrouped")).unwrap_err()
        );
        assert!(e.contains("group ungrouped has no hosts"), "{e}");
    }

    #[test]
    fn group_vars_and_host_vars_next_to_the_inventory_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.ini");
        std::fs::write(&p, "[web]\nw1 ansible_host=127.0.0.1\n").unwrap();
        // Empty, or only hidden files: nothing is lost, so it loads.
        std::fs::create_dir_all(d.path().join("group_vars/web")).unwrap();
        std::fs::create_dir(d.path().join("host_vars")).unwrap();
        std::fs::write(d.path().join("host_vars/.gitkeep"), "").unwrap();
        assert_eq!(names(&load(&p, None).unwrap()), ["w1"]);
        for file in ["group_vars/web/main.yml", "host_vars/w1.yml"] {
            std::fs::write(d.path().join(file), "ansible_user: deploy\n").unwrap();
            let dir = d.path().join(file.split('/').next().unwrap());
            let e = format!("{:#}", load(&p, None).unwrap_err());
            assert!(e.starts_with(&format!("{}: ", dir.display())), "{e}");
            assert!(e.contains("cutover reads only the inventory file"), "{e}");
            assert!(e.contains("[group:vars]") && e.contains("or remove"), "{e}");
            std::fs::remove_file(d.path().join(file)).unwrap();
        }
    }

    #[test]
    fn groups_that_include_each_other_are_refused() {
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n[a:children]\nb\n[b:children]\nweb\nc\n\
                 [c:children]\na\n",
                None,
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini: groups include each other: a -> b -> c -> a"),
            "{e}"
        );
    }

    #[test]
    fn deeply_nested_groups_do_not_overflow_the_stack() {
        // g0 > g1 > ... > g19999 > h1: the walks over the groups are loops, not recursion.
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("[g{i}:children]\ng{}\n", i + 1));
        }
        text.push_str("[g20000]\nh1 ansible_host=127.0.0.1\n[g19999:vars]\nansible_port=2201\n");
        let hosts = ini(&text, Some("g0")).unwrap();
        assert_eq!(names(&hosts), ["h1"]);
        assert_eq!(hosts[0].port, Some(2201));
    }

    #[test]
    fn ssh_aliases_pick_as_ansible_after_the_merge() {
        // The review's inventory: cutover connected to deploy@...:2200, the group's
        // `ansible_port`/`ansible_user` beating the host's `ansible_ssh_*`. Ansible merges
        // first (host over group), then the last alias defined wins.
        let hosts = ini(
            "[web]\nweb4 ansible_host=127.0.100.4 ansible_ssh_port=2299 ansible_ssh_user=root\n\
             [web:vars]\nansible_port=2200\nansible_user=deploy\n",
            None,
        )
        .unwrap();
        assert_eq!(hosts[0].port, Some(2299));
        assert_eq!(hosts[0].user.as_deref(), Some("root"));
        // Both at the same level: `ansible_ssh_*` is listed last, so it wins; likewise for
        // the address.
        let hosts = ini(
            "web5 ansible_host=127.0.100.5 ansible_ssh_host=127.0.100.6 ansible_port=2200 \
             ansible_ssh_port=2201 ansible_user=deploy ansible_ssh_user=root\n",
            None,
        )
        .unwrap();
        assert_eq!(hosts[0].address.to_string(), "127.0.100.6");
        assert_eq!(hosts[0].port, Some(2201));
        assert_eq!(hosts[0].user.as_deref(), Some("root"));
        // An error names the alias that was read.
        let e = format!(
            "{:#}",
            ini("web6 ansible_host=127.0.100.7 ansible_ssh_port=x\n", None).unwrap_err()
        );
        assert!(e.contains("host web6: ansible_ssh_port = \"x\""), "{e}");
    }

    #[test]
    fn host_order_and_variable_precedence_survive_many_groups() {
        // Hosts keep the order the file first names them in, whichever groups they are in;
        // variables go all < parent < child (siblings by name) < host.
        let hosts = ini(
            "[all:vars]\nansible_user=a\n[b]\nh3 ansible_host=127.0.0.1\nh1 ansible_host=127.0.0.1\n\
             [a]\nh2 ansible_host=127.0.0.1\nh1\n[top:children]\na\nb\n\
             [top:vars]\nansible_user=top\nansible_port=2200\n[a:vars]\nansible_user=ga\n\
             [b:vars]\nansible_user=gb\n[b]\nh2 ansible_port=2299\n",
            Some("top"),
        )
        .unwrap();
        assert_eq!(names(&hosts), ["h3", "h1", "h2"]);
        let got: Vec<_> = hosts.iter().map(|h| (h.user.as_deref(), h.port)).collect();
        assert_eq!(
            got,
            [
                (Some("gb"), Some(2200)),
                (Some("gb"), Some(2200)),
                (Some("gb"), Some(2299)),
            ]
        );
        assert_eq!(
            names(
                &ini(
                    "[a]\nh2 ansible_host=127.0.0.1\n[b]\nh1 ansible_host=127.0.0.1\n",
                    Some("b")
                )
                .unwrap()
            ),
            ["h1"]
        );
    }

    #[test]
    fn group_priority_orders_siblings_as_in_ansible() {
        // a and b are at the same depth: by name b would win; a's higher priority wins.
        let text = "[a]\nh1 ansible_host=127.0.0.1\n[b]\nh1\n\
                    [a:vars]\nansible_group_priority=10\nansible_user=u_a\n\
                    [b:vars]\nansible_user=u_b\n";
        assert_eq!(ini(text, None).unwrap()[0].user.as_deref(), Some("u_a"));
        // Below the default of 1, a loses to b even though it comes first by name.
        let low = text.replace("priority=10", "priority=0");
        assert_eq!(ini(&low, None).unwrap()[0].user.as_deref(), Some("u_b"));
        // Depth still comes first: a child beats its parent whatever their priorities.
        let nested = "[p:children]\nc\n[c]\nh1 ansible_host=127.0.0.1\n\
                      [p:vars]\nansible_group_priority=99\nansible_user=u_p\n\
                      [c:vars]\nansible_user=u_c\n";
        assert_eq!(ini(nested, None).unwrap()[0].user.as_deref(), Some("u_c"));
        // YAML, where the priority is a number.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        std::fs::write(
            &p,
            "all:\n  children:\n    a:\n      vars:\n        ansible_group_priority: 10\n\
             \x20       ansible_user: u_a\n      hosts:\n        h1:\n          ansible_host: 127.0.0.1\n\
             \x20   b:\n      vars:\n        ansible_user: u_b\n      hosts:\n        h1:\n",
        )
        .unwrap();
        assert_eq!(load(&p, None).unwrap()[0].user.as_deref(), Some("u_a"));
        // Not a number: refused on its line.
        let e = format!(
            "{:#}",
            ini(&text.replace("priority=10", "priority=high"), None).unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:6: group a: ansible_group_priority = \"high\""),
            "{e}"
        );
    }

    #[test]
    fn comments_after_children_and_headers_are_allowed_junk_is_not() {
        let hosts = ini(
            "[web] # the web tier\nw1 ansible_host=127.0.0.1\n[db]#databases\n\
             d1 ansible_host=127.0.0.1\n[app:children]   # all of it\nweb   # the web tier\ndb\t#x\n",
            Some("app"),
        )
        .unwrap();
        assert_eq!(names(&hosts), ["w1", "d1"]);
        // Text after a header is refused, with its line, not dropped.
        for (text, line, what) in [
            (
                "[web]\nw1 ansible_host=127.0.0.1\n[db] junk\nd1\n",
                3,
                "\"junk\"",
            ),
            ("[web]]\nw1 ansible_host=127.0.0.1\n", 1, "\"]\""),
            (
                "[web]\nw1 ansible_host=127.0.0.1\n[app:children] web\n",
                3,
                "\"web\"",
            ),
        ] {
            let e = format!("{:#}", ini(text, None).unwrap_err());
            assert!(
                e.contains(&format!("hosts.ini:{line}:")) && e.contains(what),
                "{text:?} -> {e}"
            );
            assert!(e.contains("alone on its line"), "{e}");
        }
        // Two names on one children line are still refused.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.0.1\n[app:children]\nweb db # two\n",
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:4:") && e.contains("one group name per line"),
            "{e}"
        );
    }

    #[test]
    fn yaml_errors_name_the_line_of_the_host_or_group() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        for (text, line, what) in [
            (
                "all:\n  children:\n    web:\n      hosts:\n        web1:\n          ansible_host: 127.0.0.1\n\
                 \x20         ansible_port: 99999\n",
                7,
                "host web1: ansible_port = \"99999\" is not a port number",
            ),
            (
                "all:\n  hosts:\n    ok1:\n      ansible_host: 127.0.0.1\n    web1:2222:\n",
                5,
                "write `web1 ansible_port=2222`",
            ),
            (
                "all:\n  hosts:\n    web[3:1]:\n",
                3,
                "\"web[3:1]\": [3:1]: the range runs backwards: write it [1:3]",
            ),
            (
                "all:\n  children:\n    web:\n      hosts:\n        w1:\n    bad group:\n",
                6,
                "\"bad group\" is not a group name",
            ),
            (
                "all:\n  vars:\n    ansible_user: \"-oProxyCommand=x\"\n  hosts:\n    w1:\n\
                 \x20     ansible_host: 127.0.0.1\n",
                3,
                "host w1: ansible_user",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", load(&p, None).unwrap_err());
            assert!(
                e.contains(&format!("hosts.yml:{line}: ")) && e.contains(what),
                "{text:?} -> {e}"
            );
        }
    }

    #[test]
    fn yaml_nulls_are_unset_and_tagged_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        let load_with = |vars: &str| {
            std::fs::write(
                &p,
                format!(
                    "all:\n  vars:\n    ansible_port: 2200\n    cutover_root: /srv/a\n  hosts:\n    \
                     w1:\n      ansible_host: 127.0.120.1\n{vars}"
                ),
            )
            .unwrap();
            load(&p, None)
        };
        // A null is not set: it hides the group's value, as in Ansible, and the default
        // applies; the older alias, when set, is read instead.
        let h = load_with("      ansible_port: ~\n      cutover_root:\n      ansible_user: null\n")
            .unwrap();
        assert_eq!((h[0].port, h[0].user.as_deref()), (None, None));
        assert_eq!(h[0].root, PathBuf::new());
        let h = load_with("      ansible_port: ~\n      ansible_ssh_port: 2201\n").unwrap();
        assert_eq!(h[0].port, Some(2201));
        // Tagged or not a single value: an error on its line, naming the variable. These
        // used to read as "": the default root, the inventory's directory as the key.
        for (var, what) in [
            (
                "cutover_root: !unsafe /srv/b",
                "cutover_root is tagged !unsafe",
            ),
            (
                "ansible_ssh_private_key_file: !unsafe /k/id",
                "ansible_ssh_private_key_file is tagged !unsafe",
            ),
            (
                "ansible_user: !unsafe deploy",
                "ansible_user is tagged !unsafe",
            ),
            ("ansible_port: [22]", "ansible_port is a list or a map"),
            ("cutover_root: {a: 1}", "cutover_root is a map"),
            (
                "ansible_user: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n        6162",
                "ansible_user is encrypted (!vault)",
            ),
        ] {
            let e = format!("{:#}", load_with(&format!("      {var}\n")).unwrap_err());
            assert!(
                e.contains(&format!("hosts.yml:8: host w1: {what}")),
                "{var} -> {e}"
            );
        }
        let e = format!(
            "{:#}",
            load_with("      cutover_root: !unsafe /b\n").unwrap_err()
        );
        assert!(e.contains("remove the tag"), "{e}");
        // Where cutover does not read the variable, anything goes.
        let h =
            load_with("      ntp: [a, b]\n      motd: !unsafe '{{ x }}'\n      n: ~\n").unwrap();
        assert_eq!(h[0].port, Some(2200));
        // A group's priority is read too.
        std::fs::write(
            &p,
            "all:\n  children:\n    web:\n      vars:\n        ansible_group_priority: !unsafe 3\n\
             \x20     hosts:\n        w1:\n          ansible_host: 127.0.120.1\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&p, None).unwrap_err());
        assert!(
            e.contains("hosts.yml:5: group web: ansible_group_priority is tagged !unsafe"),
            "{e}"
        );
    }

    #[test]
    fn yaml_detection() {
        assert!(looks_like_yaml("# c\nall:\n  hosts:\n"));
        assert!(!looks_like_yaml("[web]\nweb1\n"));
        assert!(!looks_like_yaml("web1 ansible_host=1.2.3.4\n"));
        // A comment after the first key, or after `---`.
        assert!(looks_like_yaml("all:   # production servers\n  hosts:\n"));
        assert!(looks_like_yaml("--- # inventory\nall:\n"));
        // A comment that happens to end in ':' does not make an INI line YAML.
        assert!(!looks_like_yaml("web1   # the first one, see:\n"));
        // JSON is YAML.
        assert!(looks_like_yaml("\n  {\"all\": {}}\n"));
    }

    #[test]
    fn duplicate_yaml_keys_are_reported_in_our_words() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts.yml");
        for (text, line, key) in [
            (
                "all:\n  hosts:\n    w1:\n      ansible_host: 127.0.120.1\n    w1:\n      ansible_host: 127.0.120.2\n",
                5,
                "w1",
            ),
            (
                "all:\n  vars:\n    ansible_user: a\n    ansible_user: b\n",
                4,
                "ansible_user",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", load(&p, None).unwrap_err());
            assert!(
                e.starts_with(&format!(
                    "{}:{line}: \"{key}\" is written twice in the same mapping",
                    p.display()
                )),
                "{e}"
            );
            assert!(
                e.contains("merge the two into one") && !e.contains("DuplicateKeyPolicy"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_host_name_that_does_not_resolve_asks_for_ansible_host() {
        // Without ansible_host the name is the address. This said `ansible_host
        // "w1.invalid" does not resolve`, naming a variable the file never set.
        for text in [
            "[web]\nw1.invalid ansible_user=deploy\n",
            "all:\n  hosts:\n    w1.invalid:\n      ansible_user: deploy\n",
        ] {
            let e = format!("{:#}", ini(text, None).unwrap_err());
            assert!(
                e.contains(&format!(
                    "hosts.ini:{}: host w1.invalid: no ansible_host gives its address, and its \
                     name \"w1.invalid\" does not resolve",
                    if text.starts_with("all:") { 3 } else { 2 }
                )),
                "{e}"
            );
            assert!(e.contains("set ansible_host=<address> for it"), "{e}");
        }
        // With one, the variable that holds the name is the one named.
        let e = format!(
            "{:#}",
            ini("[web]\nw1 ansible_ssh_host=w1.invalid\n", None).unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:2: host w1: ansible_ssh_host \"w1.invalid\" does not resolve"),
            "{e}"
        );
        assert!(!e.contains("no ansible_host"), "{e}");
    }

    #[test]
    fn connection_variables_cutover_would_ignore_are_refused() {
        // Ignored, these made cutover connect directly where Ansible goes through a bastion,
        // or over ssh to a host Ansible runs locally.
        for (vars, line, what) in [
            (
                "ansible_connection=local",
                2,
                "host w1: ansible_connection = \"local\": cutover reaches every host one way",
            ),
            (
                "ansible_ssh_common_args='-o ProxyJump=bastion'",
                2,
                "host w1: ansible_ssh_common_args = \"-o ProxyJump=bastion\": cutover does not \
                 pass ssh options",
            ),
            (
                "ansible_ssh_extra_args=-4",
                2,
                "host w1: ansible_ssh_extra_args = \"-4\"",
            ),
        ] {
            let e = format!(
                "{:#}",
                ini(
                    &format!("[web]\nw1 ansible_host=127.0.120.1 {vars}\n"),
                    None
                )
                .unwrap_err()
            );
            assert!(e.contains(&format!("hosts.ini:{line}: {what}")), "{e}");
        }
        // Set for a group: reported where it is set, with the Host block to write.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nw1 ansible_host=127.0.120.1\n[web:vars]\n\
                 ansible_ssh_common_args=\"-o ProxyJump=bastion\"\n",
                None,
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:4: host w1: ansible_ssh_common_args"),
            "{e}"
        );
        assert!(
            e.contains("~/.ssh/config") && e.contains("`Host 127.0.120.1`"),
            "{e}"
        );
        // A container Ansible reaches by a name that does not resolve: the connection is
        // what to fix, not the address.
        let e = format!(
            "{:#}",
            ini(
                "[web]\nc1.invalid ansible_connection=community.docker.docker\n",
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains(
                "hosts.ini:2: host c1.invalid: ansible_connection = \"community.docker.docker\""
            ),
            "{e}"
        );
        // Behind a bastion, with a name only the bastion resolves: the options are what to
        // fix (it once said only "does not resolve"), and the name with them.
        let e = format!(
            "{:#}",
            ini(
                "[web]\ndb1.invalid ansible_ssh_common_args='-o ProxyJump=bastion'\n",
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("hosts.ini:2: host db1.invalid: ansible_ssh_common_args")
                && e.contains("give the host an ansible_host this machine can resolve"),
            "{e}"
        );
        // ssh itself, empty options, and hosts outside the group deployed are fine.
        let hosts = ini(
            "localhost ansible_connection=local\n[web]\n\
             w1 ansible_host=127.0.120.1 ansible_connection=ssh ansible_ssh_common_args=''\n",
            Some("web"),
        )
        .unwrap();
        assert_eq!(names(&hosts), ["w1"]);
    }

    #[test]
    fn json_inventories_are_read_as_yaml() {
        // Read as INI, this was `host "{all:" is not a valid name`.
        let d = tempfile::tempdir().unwrap();
        let json = "{\"all\": {\"children\": {\"web\": {\"hosts\": {\"w1\": \
                    {\"ansible_host\": \"127.0.120.1\", \"ansible_port\": 2201}}}}}}\n";
        for file in ["hosts.json", "production"] {
            let p = d.path().join(file);
            std::fs::write(&p, json).unwrap();
            let hosts = load(&p, Some("web")).unwrap();
            assert_eq!(names(&hosts), ["w1"]);
            assert_eq!(hosts[0].port, Some(2201));
        }
        // `ansible-inventory --list` output is not that format: say how to get it.
        let p = d.path().join("list.json");
        std::fs::write(
            &p,
            "{\"_meta\": {\"hostvars\": {}}, \"all\": {\"children\": [\"ungrouped\"]}}\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&p, None).unwrap_err());
        assert!(e.contains("ansible-inventory --list --yaml"), "{e}");
    }

    #[test]
    fn yaml_without_extension_and_with_a_comment_is_read_as_yaml() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("production");
        std::fs::write(
            &p,
            "all:   # production servers\n  hosts:\n    web1:\n      ansible_host: 127.0.0.1\n      ansible_port: 2201\n",
        )
        .unwrap();
        let hosts = load(&p, None).unwrap();
        assert_eq!(names(&hosts), ["web1"]);
        assert_eq!(hosts[0].port, Some(2201));
    }
}
