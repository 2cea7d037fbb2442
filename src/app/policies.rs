//! The policy file at runtime: the rules in effect, each group's policy as
//! discovery resolved it (so an entry read back from the Redis queue finds
//! its procedure's without matching the rules again), the last reload's
//! error, and the one warning per rule that matches no registration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::discovery::GroupState;
use crate::forward::policy::Policy;
use crate::policy::{Context, Policies};

/// A group's rule (its index) and policy; `None`: the defaults.
type Resolved = (Option<usize>, Option<Arc<Policy>>);

pub struct PolicyState {
    current: Arc<Policies>,
    context: Context,
    /// Each exact group's rule and policy, by procedure.
    by_procedure: HashMap<Arc<str>, Resolved>,
    /// The last reload that was refused, and why (cleared by one that
    /// applies).
    last_error: Option<(SystemTime, String)>,
    /// Whether the rules matching nothing were said, since the last load.
    checked_unmatched: bool,
    /// With the Redis queue: whether ordered procedures have partitions.
    /// Rules cannot order a procedure without them (a restart can).
    partitions: Option<bool>,
}

impl PolicyState {
    /// `partitions`: `Some(on)` with the Redis queue.
    pub fn new(current: Arc<Policies>, context: Context, partitions: Option<bool>) -> PolicyState {
        PolicyState {
            current,
            context,
            by_procedure: HashMap::new(),
            last_error: None,
            checked_unmatched: false,
            partitions,
        }
    }

    pub fn current(&self) -> &Arc<Policies> {
        &self.current
    }

    pub fn last_error(&self) -> Option<&(SystemTime, String)> {
        self.last_error.as_ref()
    }

    /// The policy of `procedure`: its group's, else the first rule that
    /// matches it (a pattern group's concrete procedure), else `None`.
    pub fn of(&self, procedure: &str) -> Option<Arc<Policy>> {
        if self.current.rules().is_empty() {
            return None;
        }
        match self.by_procedure.get(procedure) {
            Some((_, policy)) => policy.clone(),
            None => self.current.resolve(procedure).policy,
        }
    }

    /// The rule (index) that applies to `procedure`'s group, if known.
    pub fn rule_of(&self, procedure: &str) -> Option<usize> {
        self.by_procedure.get(procedure).and_then(|(rule, _)| *rule)
    }

    /// The groups as discovery has them now. Once `synced` (the
    /// registration list answered), each rule that matches no group is said
    /// once per load.
    /// Returns the groups whose `max_deliveries` is new or changed (`None`:
    /// the global one), for the Redis queue.
    pub fn note_groups<'a>(
        &mut self,
        groups: impl Iterator<Item = &'a GroupState>,
        synced: bool,
    ) -> Vec<(Arc<str>, Option<u32>)> {
        let before = std::mem::take(&mut self.by_procedure);
        let mut changed = Vec::new();
        for g in groups {
            let max = g.policy.as_ref().map(|p| p.max_deliveries);
            let was = before
                .get(&g.procedure)
                .map(|(_, p)| p.as_ref().map(|p| p.max_deliveries));
            if was.map_or(max.is_some(), |was| was != max) {
                changed.push((g.procedure.clone(), max));
            }
            self.by_procedure
                .insert(g.procedure.clone(), (g.rule, g.policy.clone()));
        }
        self.warn_unmatched(synced);
        changed
    }

    /// Each rule that matches no group, said once per load (once the
    /// registration list is answered).
    fn warn_unmatched(&mut self, synced: bool) {
        if !synced || self.checked_unmatched || self.current.rules().is_empty() {
            return;
        }
        self.checked_unmatched = true;
        for (i, rule) in self.current.rules().iter().enumerate() {
            if !self.by_procedure.values().any(|(r, _)| *r == Some(i)) {
                tracing::warn!(
                    rule = %rule.pattern,
                    line = rule.line,
                    "a rule of the policy file matches no registration (yet); check its pattern"
                );
            }
        }
    }

    /// The file read again (`text`, or why it could not be read): the new
    /// rules when they are usable, else why not (the rules in effect stay).
    pub fn reload(&mut self, text: std::io::Result<String>) -> Result<Arc<Policies>, String> {
        let path = self
            .current
            .source()
            .map(|s| s.path.display().to_string())
            .unwrap_or_default();
        let refused = |state: &mut PolicyState, why: String| {
            state.last_error = Some((SystemTime::now(), why.clone()));
            Err(why)
        };
        let text = match text {
            Ok(text) => text,
            Err(e) => return refused(self, format!("{path}: cannot be read: {e}")),
        };
        let policies = match self.current.reload(&text, &self.context) {
            Ok(policies) => policies,
            Err(problems) => return refused(self, problems.join("\n")),
        };
        if self.partitions == Some(false) && policies.orders_any() {
            let why = format!(
                "{path}: a rule sets order_by, but this instance started without ordering \
                 (SUBTOCALL_ORDER_BY=none and no rule ordering anything), so the Redis queue \
                 has no partitions: restart the instances to apply it"
            );
            return refused(self, why);
        }
        self.current = Arc::new(policies);
        self.last_error = None;
        self.checked_unmatched = false;
        Ok(self.current.clone())
    }
}
