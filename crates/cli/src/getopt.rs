//! GNU `getopt_long` argument parsing, with glibc's error messages.
//!
//! QEMU's tools parse their command lines with glibc: options may follow operands
//! (arguments are permuted), short options cluster (`-qf raw`), long options may be
//! abbreviated to a unique prefix, and `--` ends option processing. No crate reproduces
//! those rules and messages exactly, which scripts and QEMU's test suite depend on, so
//! this is written out here.

/// Whether a long option takes an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    /// No argument.
    No,
    /// A required argument (`--name=value` or `--name value`).
    Required,
    /// An optional argument (`--name=value` only).
    Optional,
}

/// A long option and the key it reports.
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    /// Name without the dashes.
    pub name: &'static str,
    /// Argument rule.
    pub has_arg: HasArg,
    /// Key reported for it (a short option character, or any other code).
    pub key: i32,
}

impl LongOpt {
    /// A long option.
    pub const fn new(name: &'static str, has_arg: HasArg, key: i32) -> LongOpt {
        LongOpt { name, has_arg, key }
    }
}

/// Parsed command line: options in order, then operands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// (key, argument) in command-line order.
    pub opts: Vec<(i32, Option<String>)>,
    /// Operands, in order.
    pub operands: Vec<String>,
}

/// A glibc-style parse error message (without trailing newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetoptError(pub String);

/// Parses `args` (without the program name) like `getopt_long`. `prog` prefixes error
/// messages. A leading `+` in `shortopts` stops at the first operand (no permutation).
pub fn parse(
    prog: &str,
    args: &[String],
    shortopts: &str,
    longopts: &[LongOpt],
) -> Result<Parsed, GetoptError> {
    let (permute, shortopts) = match shortopts.strip_prefix('+') {
        Some(rest) => (false, rest),
        None => (true, shortopts),
    };
    let shortopts = shortopts.strip_prefix(':').unwrap_or(shortopts);
    let short_arg = |c: char| -> Option<HasArg> {
        let idx = shortopts.find(c)?;
        if c == ':' {
            return None;
        }
        let rest = &shortopts[idx + c.len_utf8()..];
        Some(if rest.starts_with("::") {
            HasArg::Optional
        } else if rest.starts_with(':') {
            HasArg::Required
        } else {
            HasArg::No
        })
    };
    let mut out = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            out.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = longopts.iter().find(|o| o.name == name);
            let opt = match exact {
                Some(o) => *o,
                None => {
                    let cands: Vec<&LongOpt> = longopts
                        .iter()
                        .filter(|o| o.name.starts_with(name))
                        .collect();
                    let distinct = cands
                        .iter()
                        .any(|c| c.key != cands[0].key || c.has_arg != cands[0].has_arg);
                    match cands.len() {
                        0 => return Err(GetoptError(format!("{prog}: unrecognized option '{a}'"))),
                        _ if distinct => {
                            let list: Vec<String> =
                                cands.iter().map(|c| format!("'--{}'", c.name)).collect();
                            return Err(GetoptError(format!(
                                "{prog}: option '{a}' is ambiguous; possibilities: {}",
                                list.join(" ")
                            )));
                        }
                        _ => *cands[0],
                    }
                }
            };
            let arg = match opt.has_arg {
                HasArg::No => {
                    if inline.is_some() {
                        return Err(GetoptError(format!(
                            "{prog}: option '--{}' doesn't allow an argument",
                            opt.name
                        )));
                    }
                    None
                }
                HasArg::Optional => inline,
                HasArg::Required => match inline {
                    Some(v) => Some(v),
                    None => {
                        if i < args.len() {
                            i += 1;
                            Some(args[i - 1].clone())
                        } else {
                            return Err(GetoptError(format!(
                                "{prog}: option '--{}' requires an argument",
                                opt.name
                            )));
                        }
                    }
                },
            };
            out.opts.push((opt.key, arg));
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                match short_arg(c) {
                    None => {
                        return Err(GetoptError(format!("{prog}: invalid option -- '{c}'")));
                    }
                    Some(HasArg::No) => out.opts.push((c as i32, None)),
                    Some(kind) => {
                        let rest: String = chars[j..].iter().collect();
                        if !rest.is_empty() {
                            out.opts.push((c as i32, Some(rest)));
                        } else if kind == HasArg::Optional {
                            out.opts.push((c as i32, None));
                        } else if i < args.len() {
                            out.opts.push((c as i32, Some(args[i].clone())));
                            i += 1;
                        } else {
                            return Err(GetoptError(format!(
                                "{prog}: option requires an argument -- '{c}'"
                            )));
                        }
                        break;
                    }
                }
            }
            continue;
        }
        out.operands.push(a.clone());
        if !permute {
            out.operands.extend(args[i..].iter().cloned());
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    const LONG: &[LongOpt] = &[
        LongOpt::new("output", HasArg::Required, 1000),
        LongOpt::new("object", HasArg::Required, 1001),
        LongOpt::new("help", HasArg::No, 'h' as i32),
    ];

    #[test]
    fn permutes_and_clusters() {
        let p = parse(
            "t",
            &s(&["x.img", "-qf", "raw", "1M", "--out", "json"]),
            "qf:h",
            LONG,
        )
        .unwrap();
        assert_eq!(p.operands, s(&["x.img", "1M"]));
        assert_eq!(
            p.opts,
            vec![
                ('q' as i32, None),
                ('f' as i32, Some("raw".into())),
                (1000, Some("json".into()))
            ]
        );
    }

    #[test]
    fn glibc_messages() {
        let e = parse("qemu-img create", &s(&["-Z"]), "f:", LONG).unwrap_err();
        assert_eq!(e.0, "qemu-img create: invalid option -- 'Z'");
        let e = parse("p", &s(&["--o=json"]), "", LONG).unwrap_err();
        assert_eq!(
            e.0,
            "p: option '--o=json' is ambiguous; possibilities: '--output' '--object'"
        );
        let e = parse("p", &s(&["-f"]), "f:", LONG).unwrap_err();
        assert_eq!(e.0, "p: option requires an argument -- 'f'");
        let e = parse("p", &s(&["--foo"]), "", LONG).unwrap_err();
        assert_eq!(e.0, "p: unrecognized option '--foo'");
    }

    #[test]
    fn double_dash_ends_options() {
        let p = parse("p", &s(&["--", "-f"]), "f:", LONG).unwrap();
        assert_eq!(p.operands, s(&["-f"]));
    }
}
