//! The rule engine: which rules an event arms, the state machine, breakpoints that
//! suspend requests, and the check every request makes against the armed rules.
//!
//! Events arm `inject-error` rules (the set of armed rules is replaced whenever an event
//! arms at least one), switch the state (`set-state`), and suspend the request that fired
//! them at breakpoints (`break EVENT TAG` in qemu-io) until `resume TAG`. A request fails
//! with the first armed rule whose offset and request type match it.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::config::{IoType, RuleSpec};
use super::event::Event;

/// A rule in the engine.
#[derive(Debug, Clone)]
enum Action {
    Inject {
        errno: i64,
        offset: Option<u64>,
        once: bool,
        immediately: bool,
        iotypes: u32,
    },
    SetState(i64),
    Suspend(String),
}

#[derive(Debug, Clone)]
struct Rule {
    id: u64,
    event: Event,
    state: i64,
    action: Action,
}

/// A request waiting at a breakpoint.
struct Suspended {
    tag: String,
    wake: oneshot::Sender<()>,
}

#[derive(Default)]
struct Inner {
    /// Rules, newest first (QEMU adds rules at the head of each event's list).
    rules: Vec<Rule>,
    /// Ids of the armed inject-error rules, in the order they are checked.
    active: Vec<u64>,
    state: i64,
    suspended: Vec<Suspended>,
    next_id: u64,
}

/// What a request must do after [`Rules::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    /// The errno to fail with.
    pub errno: i32,
    /// Fail without first yielding to the event loop.
    pub immediately: bool,
}

/// The rules of one blkdebug node.
pub struct Rules {
    inner: Mutex<Inner>,
}

/// What a breakpoint operation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakError {
    /// No such event, tag or suspended request (ENOENT).
    NotFound,
}

impl Rules {
    /// The engine for `specs`, in state 1 (QEMU's initial state).
    pub fn new(specs: &[RuleSpec]) -> Rules {
        let mut inner = Inner {
            state: 1,
            ..Default::default()
        };
        for s in specs {
            let (event, state, action) = match s.clone() {
                RuleSpec::InjectError {
                    event,
                    state,
                    errno,
                    offset,
                    once,
                    immediately,
                    iotypes,
                } => (
                    event,
                    state,
                    Action::Inject {
                        errno,
                        offset,
                        once,
                        immediately,
                        iotypes,
                    },
                ),
                RuleSpec::SetState {
                    event,
                    state,
                    new_state,
                } => (event, state, Action::SetState(new_state)),
            };
            inner.add(event, state, action);
        }
        Rules {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Processes `event`: arms rules, switches the state, and returns what the firing
    /// request must wait for (one receiver per breakpoint hit), with their tags.
    pub fn event(&self, event: Event) -> Vec<(String, oneshot::Receiver<()>)> {
        let mut g = self.lock();
        let cur = g.state;
        let mut new_state = cur;
        let mut armed: Option<Vec<u64>> = None;
        let mut hits = Vec::new();
        let matching: Vec<Rule> = g
            .rules
            .iter()
            .filter(|r| r.event == event && (r.state == 0 || r.state == cur))
            .cloned()
            .collect();
        for r in matching {
            match r.action {
                Action::Inject { .. } => {
                    // Each armed rule goes to the front: the oldest ends up first.
                    armed.get_or_insert_with(Vec::new).insert(0, r.id);
                }
                Action::SetState(s) => new_state = s,
                Action::Suspend(tag) => {
                    g.rules.retain(|x| x.id != r.id);
                    let (tx, rx) = oneshot::channel();
                    g.suspended.insert(
                        0,
                        Suspended {
                            tag: tag.clone(),
                            wake: tx,
                        },
                    );
                    hits.push((tag, rx));
                }
            }
        }
        if let Some(a) = armed {
            g.active = a;
        }
        g.state = new_state;
        hits
    }

    /// The error a request of `iotype` on `[offset, offset + bytes)` fails with, if
    /// an armed rule matches it (a `once` rule is then removed).
    pub fn check(&self, offset: u64, bytes: u64, iotype: IoType) -> Option<Injected> {
        let mut g = self.lock();
        let mut found = None;
        for id in &g.active {
            let Some(r) = g.rules.iter().find(|r| r.id == *id) else {
                continue;
            };
            if let Action::Inject {
                errno,
                offset: at,
                once,
                immediately,
                iotypes,
            } = r.action
            {
                let hit = match at {
                    None => true,
                    Some(at) => bytes > 0 && at >= offset && at < offset + bytes,
                };
                if hit && iotypes & iotype.bit() != 0 {
                    found = Some((*id, errno, once, immediately));
                    break;
                }
            }
        }
        let (id, errno, once, immediately) = found?;
        if errno == 0 {
            return None;
        }
        if once {
            g.active.retain(|x| *x != id);
            g.rules.retain(|x| x.id != id);
        }
        // QEMU returns the negated value: a negative errno makes the request succeed.
        (errno > 0).then_some(Injected {
            errno: errno as i32,
            immediately,
        })
    }

    /// Adds a breakpoint: the next request firing `event` is suspended as `tag`.
    pub fn add_breakpoint(&self, event: &str, tag: &str) -> Result<(), BreakError> {
        let ev = Event::parse(event).ok_or(BreakError::NotFound)?;
        self.lock().add(ev, 0, Action::Suspend(tag.to_string()));
        Ok(())
    }

    /// Removes the breakpoints called `tag` and resumes requests suspended as `tag`.
    pub fn remove_breakpoint(&self, tag: &str) -> Result<(), BreakError> {
        let mut found = false;
        while self.resume(tag).is_ok() {
            found = true;
        }
        let mut g = self.lock();
        let before = g.rules.len();
        g.rules
            .retain(|r| !matches!(&r.action, Action::Suspend(t) if t == tag));
        found |= g.rules.len() != before;
        if found {
            Ok(())
        } else {
            Err(BreakError::NotFound)
        }
    }

    /// Resumes the request suspended as `tag`.
    pub fn resume(&self, tag: &str) -> Result<(), BreakError> {
        let s = {
            let mut g = self.lock();
            let i = g
                .suspended
                .iter()
                .position(|s| s.tag == tag)
                .ok_or(BreakError::NotFound)?;
            g.suspended.remove(i)
        };
        super::print(&format!("blkdebug: Resuming request '{}'\n", s.tag));
        let _ = s.wake.send(());
        Ok(())
    }

    /// Whether a request is suspended as `tag`.
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|s| s.tag == tag)
    }

    /// Resumes every suspended request (when the node closes).
    pub fn resume_all(&self) {
        let all = std::mem::take(&mut self.lock().suspended);
        for s in all {
            let _ = s.wake.send(());
        }
    }
}

impl Inner {
    fn add(&mut self, event: Event, state: i64, action: Action) {
        let id = self.next_id;
        self.next_id += 1;
        self.rules.insert(
            0,
            Rule {
                id,
                event,
                state,
                action,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::DEFAULT_IOTYPES;
    use super::*;

    fn inject(event: Event, errno: i64, offset: Option<u64>, once: bool) -> RuleSpec {
        RuleSpec::InjectError {
            event,
            state: 0,
            errno,
            offset,
            once,
            immediately: false,
            iotypes: DEFAULT_IOTYPES,
        }
    }

    #[test]
    fn rules_arm_on_their_event() {
        let r = Rules::new(&[inject(Event::WriteAio, 28, None, false)]);
        assert_eq!(r.check(0, 512, IoType::Write), None);
        r.event(Event::ReadAio);
        assert_eq!(r.check(0, 512, IoType::Write), None);
        r.event(Event::WriteAio);
        let e = r.check(0, 512, IoType::Read).unwrap();
        assert_eq!(e.errno, 28);
        assert!(r.check(0, 512, IoType::Flush).is_some());
        assert!(r.check(0, 512, IoType::BlockStatus).is_none());
    }

    #[test]
    fn once_rules_fire_once_and_offsets_must_match() {
        let r = Rules::new(&[inject(Event::None, 5, Some(1024), true)]);
        r.event(Event::None);
        assert!(r.check(0, 512, IoType::Read).is_none());
        assert!(r.check(0, 0, IoType::Read).is_none());
        assert_eq!(r.check(512, 1024, IoType::Read).map(|i| i.errno), Some(5));
        assert!(r.check(512, 1024, IoType::Read).is_none());
        r.event(Event::None);
        assert!(r.check(512, 1024, IoType::Read).is_none());
    }

    #[test]
    fn first_defined_rule_wins_and_states_gate_rules() {
        let r = Rules::new(&[
            inject(Event::L2Load, 5, None, false),
            inject(Event::L2Load, 28, None, false),
            RuleSpec::InjectError {
                event: Event::ReadAio,
                state: 2,
                errno: 7,
                offset: None,
                once: false,
                immediately: true,
                iotypes: IoType::Read.bit(),
            },
            RuleSpec::SetState {
                event: Event::L2Load,
                state: 1,
                new_state: 2,
            },
        ]);
        r.event(Event::L2Load);
        assert_eq!(r.check(0, 1, IoType::Read).map(|i| i.errno), Some(5));
        r.event(Event::ReadAio);
        let i = r.check(0, 1, IoType::Read).unwrap();
        assert_eq!((i.errno, i.immediately), (7, true));
        assert!(r.check(0, 1, IoType::Write).is_none());
    }

    #[test]
    fn breakpoints_suspend_and_resume() {
        let r = Rules::new(&[]);
        assert_eq!(r.add_breakpoint("bogus", "A"), Err(BreakError::NotFound));
        r.add_breakpoint("write_aio", "A").unwrap();
        assert!(r.event(Event::ReadAio).is_empty());
        let mut hits = r.event(Event::WriteAio);
        assert_eq!(hits.len(), 1);
        assert!(r.is_suspended("A"));
        // The breakpoint is used up.
        assert!(r.event(Event::WriteAio).is_empty());
        assert_eq!(r.resume("B"), Err(BreakError::NotFound));
        r.resume("A").unwrap();
        assert!(!r.is_suspended("A"));
        assert!(hits.pop().unwrap().1.try_recv().is_ok());
        assert_eq!(r.remove_breakpoint("A"), Err(BreakError::NotFound));
        r.add_breakpoint("write_aio", "C").unwrap();
        r.remove_breakpoint("C").unwrap();
        assert!(r.event(Event::WriteAio).is_empty());
    }
}
