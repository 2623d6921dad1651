//! blkdebug's rules as the user writes them: the config file (`[inject-error]` and
//! `[set-state]` sections of `key = "value"` lines, read the way QEMU's config parser
//! reads them) and the `inject-error.N.*` / `set-state.N.*` options, checked and turned
//! into [`RuleSpec`]s.

use rqemu_opts::KeyVal;

use super::event::Event;
use crate::error::{Error, Result};

/// The kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Write-zeroes requests.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Allocation-status queries.
    BlockStatus,
}

impl IoType {
    /// Parses QEMU's name of the type.
    pub fn parse(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    /// The type's bit in a rule's mask.
    pub fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// The types a rule without `iotype` fails: everything but block status.
pub const DEFAULT_IOTYPES: u32 = (1 << IoType::Read as u32)
    | (1 << IoType::Write as u32)
    | (1 << IoType::WriteZeroes as u32)
    | (1 << IoType::Discard as u32)
    | (1 << IoType::Flush as u32);

/// One rule of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSpec {
    /// `[inject-error]`: after `event`, matching requests fail.
    InjectError {
        /// The event that arms the rule.
        event: Event,
        /// Only in this state (0: any).
        state: i64,
        /// The error (positive errno; 0 or less injects nothing).
        errno: i64,
        /// Only requests covering this byte (`sector` * 512), if given.
        offset: Option<u64>,
        /// The rule is removed after failing one request.
        once: bool,
        /// Fail at once rather than after a round trip through the event loop.
        immediately: bool,
        /// [`IoType`] bits of the requests that fail.
        iotypes: u32,
    },
    /// `[set-state]`: after `event`, in `state`, the state becomes `new_state`.
    SetState {
        /// The event.
        event: Event,
        /// Only in this state (0: any).
        state: i64,
        /// The state to switch to.
        new_state: i64,
    },
}

/// Reads a number as QEMU's option parser does (`strtoull` with base 0: decimal, `0x`
/// hex, leading-zero octal, a minus sign negates).
fn parse_number(key: &str, v: &str) -> Result<i64> {
    let bad = || Error::invalid(format!("Parameter '{key}' expects a number"));
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let (radix, body) = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (16, h)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() {
        return Err(bad());
    }
    let n = u64::from_str_radix(body, radix).map_err(|_| bad())?;
    let n = n as i64;
    Ok(if neg { n.wrapping_neg() } else { n })
}

/// A number QEMU keeps in an `int` (`state`, `new_state`, `errno`): the low 32 bits of
/// what [`parse_number`] reads, so `errno = "4294967296"` injects nothing, as in QEMU.
fn parse_int(key: &str, v: &str) -> Result<i64> {
    Ok(i64::from(parse_number(key, v)? as i32))
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

fn parse_event(v: &str) -> Result<Event> {
    Event::parse(v).ok_or_else(|| Error::invalid(format!("invalid parameter value: {v}")))
}

/// The keys a section (`inject-error` or `set-state`) takes.
fn section_keys(group: &str) -> &'static [&'static str] {
    if group == "inject-error" {
        &[
            "event",
            "state",
            "iotype",
            "errno",
            "sector",
            "once",
            "immediately",
        ]
    } else {
        &["event", "state", "new_state"]
    }
}

/// Builds the rule of one section (`inject-error` or `set-state`) from its entries.
pub fn rule_from_entries(group: &str, entries: &[(String, String)]) -> Result<RuleSpec> {
    let inject = group == "inject-error";
    let allowed = section_keys(group);
    let mut event = None;
    let mut state = 0;
    let mut errno = libc::EIO as i64;
    let mut offset = None;
    let mut once = false;
    let mut immediately = false;
    let mut iotypes = DEFAULT_IOTYPES;
    let mut new_state = 0;
    for (k, v) in entries {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::invalid(format!("Invalid parameter '{k}'")));
        }
        match k.as_str() {
            "event" => event = Some(parse_event(v)?),
            "state" => state = parse_int(k, v)?,
            "new_state" => new_state = parse_int(k, v)?,
            "errno" => errno = parse_int(k, v)?,
            "sector" => {
                let s = parse_number(k, v)?;
                offset = (s != -1).then_some((s as u64).wrapping_mul(512));
            }
            "once" => once = parse_bool(k, v)?,
            "immediately" => immediately = parse_bool(k, v)?,
            "iotype" => {
                iotypes = IoType::parse(v)
                    .ok_or_else(|| Error::invalid(format!("invalid parameter value: {v}")))?
                    .bit()
            }
            _ => {}
        }
    }
    let event = event.ok_or_else(|| Error::invalid("Missing event name for rule"))?;
    Ok(if inject {
        RuleSpec::InjectError {
            event,
            state,
            errno,
            offset,
            once,
            immediately,
            iotypes,
        }
    } else {
        RuleSpec::SetState {
            event,
            state,
            new_state,
        }
    })
}

/// One line of a config file, as QEMU's `sscanf`-based parser sees it.
enum Line {
    Skip,
    Group(String),
    Entry(String, String),
    Bad,
}

fn scan_line(line: &str) -> Line {
    if line.is_empty() || line.starts_with('#') {
        return Line::Skip;
    }
    if let Some(rest) = line.strip_prefix('[') {
        // `[group "id"]` or `[group]`: the name runs to the closing bracket.
        let name: String = rest.chars().take_while(|&c| c != ']').take(63).collect();
        if !name.is_empty() {
            let group = name
                .split([' ', '\t', '"'])
                .next()
                .unwrap_or("")
                .to_string();
            return Line::Group(group);
        }
    }
    let t = line.trim_start();
    let key: String = t
        .chars()
        .take_while(|c| !c.is_whitespace())
        .take(63)
        .collect();
    if key.is_empty() {
        return Line::Bad;
    }
    // ` %63s = "%1023[^"]"`: anything that does not match in full leaves the value empty.
    let rest = t[key.len()..].trim_start();
    let value = rest
        .strip_prefix('=')
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix('"'))
        .and_then(|r| r.find('"').map(|end| r[..end].to_string()))
        .unwrap_or_default();
    Line::Entry(key, value)
}

/// Parses a config file into its rules, in file order.
pub fn parse_config(text: &str) -> Result<Vec<RuleSpec>> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines() {
        match scan_line(line) {
            Line::Skip => {}
            Line::Bad => return Err(Error::invalid("parse error")),
            Line::Group(g) => {
                if g != "inject-error" && g != "set-state" {
                    return Err(Error::invalid(format!("There is no option group '{g}'")));
                }
                sections.push((g, Vec::new()));
            }
            Line::Entry(k, v) => {
                let Some((group, entries)) = sections.last_mut() else {
                    return Err(Error::invalid("no group defined"));
                };
                if !section_keys(group).contains(&k.as_str()) {
                    return Err(Error::invalid(format!("Invalid parameter '{k}'")));
                }
                match entries.iter_mut().find(|(ek, _)| *ek == k) {
                    Some(e) => e.1 = v,
                    None => entries.push((k, v)),
                }
            }
        }
    }
    // Inject-error rules are set up before set-state rules, as QEMU does.
    let mut rules = Vec::new();
    for want in ["inject-error", "set-state"] {
        for (g, entries) in sections.iter().filter(|(g, _)| g == want) {
            rules.push(rule_from_entries(g, entries)?);
        }
    }
    Ok(rules)
}

/// Takes the `inject-error.N.*` and `set-state.N.*` options out of `kv`.
pub fn take_option_rules(kv: &mut KeyVal) -> Result<Vec<RuleSpec>> {
    let mut rules = Vec::new();
    for group in ["inject-error", "set-state"] {
        let mut sub = kv.take_child(group);
        let mut n = 0;
        loop {
            let entry = sub.take_child(&n.to_string());
            if entry.is_empty() {
                break;
            }
            let entries: Vec<(String, String)> = entry
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            rules.push(rule_from_entries(group, &entries)?);
            n += 1;
        }
        let leftover = sub.keys().next().map(str::to_string);
        if let Some(k) = leftover {
            return Err(Error::invalid(format!(
                "Block protocol 'blkdebug' doesn't support the option '{group}.{k}'"
            )));
        }
    }
    Ok(rules)
}

/// Splits a `blkdebug:[CONFIG]:IMAGE` filename into the config file (if named) and the
/// image's filename.
pub fn parse_filename(name: &str) -> Result<(Option<String>, String)> {
    let rest = name.strip_prefix("blkdebug:").unwrap_or(name);
    let Some((config, image)) = rest.split_once(':') else {
        return Err(Error::invalid(
            "blkdebug requires both config file and image path",
        ));
    };
    let config = (!config.is_empty()).then(|| config.to_string());
    Ok((config, image.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_sections() {
        let text = "# comment\n[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce =\"on\"\n\n[set-state]\nevent = \"none\"\nnew_state = \"2\"\n";
        let rules = parse_config(text).unwrap();
        assert_eq!(
            rules[0],
            RuleSpec::InjectError {
                event: Event::L2Load,
                state: 0,
                errno: 28,
                offset: None,
                once: true,
                immediately: false,
                iotypes: DEFAULT_IOTYPES,
            }
        );
        assert_eq!(
            rules[1],
            RuleSpec::SetState {
                event: Event::None,
                state: 0,
                new_state: 2
            }
        );
    }

    #[test]
    fn config_file_errors_read_like_qemu() {
        let err = |t: &str| parse_config(t).unwrap_err().to_string();
        assert_eq!(err("[foo]\n"), "There is no option group 'foo'");
        assert_eq!(err("errno = \"5\"\n"), "no group defined");
        assert_eq!(err("[inject-error]\n   \n"), "parse error");
        assert_eq!(
            err("[inject-error]\nonce=\"on\"\n"),
            "Invalid parameter 'once=\"on\"'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"foo\"\n"),
            "invalid parameter value: foo"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"none\"\nerrno = \"abc\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"5\"\n"),
            "Missing event name for rule"
        );
    }

    #[test]
    fn numbers_as_strtoull_reads_them() {
        assert_eq!(parse_number("x", "0x1c").unwrap(), 28);
        assert_eq!(parse_number("x", "010").unwrap(), 8);
        assert_eq!(parse_number("x", "-5").unwrap(), -5);
        assert!(parse_number("x", "1.5").is_err());
        assert!(parse_number("x", "").is_err());
    }

    #[test]
    fn int_options_keep_their_low_32_bits() {
        let text = "[inject-error]\nevent = \"none\"\nerrno = \"0x100000000\"\n[set-state]\nevent = \"none\"\nstate = \"4294967297\"\nnew_state = \"-4294967294\"\n";
        let rules = parse_config(text).unwrap();
        match &rules[0] {
            RuleSpec::InjectError { errno, .. } => assert_eq!(*errno, 0),
            r => panic!("{r:?}"),
        }
        assert_eq!(
            rules[1],
            RuleSpec::SetState {
                event: Event::None,
                state: 1,
                new_state: 2
            }
        );
        // An errno of 0 (here 2^32) injects nothing.
        let engine = super::super::rules::Rules::new(&rules);
        drop(engine.event(Event::None));
        assert_eq!(engine.check(0, 512, IoType::Read), None);
    }

    #[test]
    fn option_rules() {
        let mut kv = KeyVal::parse(
            "inject-error.0.event=none,inject-error.0.iotype=block-status,inject-error.0.sector=3,set-state.0.event=read_aio,set-state.0.new_state=42,align=512",
            None,
        )
        .unwrap();
        let rules = take_option_rules(&mut kv).unwrap();
        assert_eq!(rules.len(), 2);
        match &rules[0] {
            RuleSpec::InjectError {
                offset, iotypes, ..
            } => {
                assert_eq!(*offset, Some(1536));
                assert_eq!(*iotypes, IoType::BlockStatus.bit());
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(kv.get("align"), Some("512"));
    }

    #[test]
    fn filenames() {
        assert_eq!(
            parse_filename("blkdebug:c.conf:t.qcow2").unwrap(),
            (Some("c.conf".into()), "t.qcow2".into())
        );
        assert_eq!(
            parse_filename("blkdebug::/x/t.qcow2").unwrap(),
            (None, "/x/t.qcow2".into())
        );
        assert!(parse_filename("blkdebug:t.qcow2").is_err());
    }
}
