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
    /// Each pattern group's registration URI and policy.
    patterns: Vec<(String, Option<Arc<Policy>>)>,
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
            patterns: Vec::new(),
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

    /// The policy of `procedure`: its exact group's, else that of the
    /// pattern group whose registration it matches, else (a group gone)
    /// the first rule that matches it; `None` for the defaults.
    pub fn of(&self, procedure: &str) -> Option<Arc<Policy>> {
        if self.current.rules().is_empty() {
            return None;
        }
        if let Some((_, policy)) = self.by_procedure.get(procedure) {
            return policy.clone();
        }
        let pattern = self
            .patterns
            .iter()
            .find(|(uri, _)| super::view::wildcard_matches(uri, procedure));
        match pattern {
            Some((_, policy)) => policy.clone(),
            None => self.current.resolve(procedure).policy,
        }
    }

    /// The pattern groups as discovery has them now (see
    /// [`crate::discovery::Discovery::pattern_policies`]).
    pub fn note_patterns(&mut self, patterns: Vec<(String, Option<Arc<Policy>>)>) {
        self.patterns = patterns;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::tests::defaults;

    fn state(text: &str) -> PolicyState {
        let context = Context {
            markers: vec!["SUB_".into()],
            max_in_flight: 256,
        };
        let policies = Policies::load("p.toml".into(), text, defaults(), &context).unwrap();
        PolicyState::new(Arc::new(policies), context, Some(true))
    }

    #[test]
    fn an_entry_of_a_pattern_group_takes_its_groups_policy_not_its_own_names() {
        let mut s = state(
            "[[policy]]\nprocedure = \"com.example..SUB_ev\"\ncall_timeout = \"1s\"\n\n\
             [[policy]]\nprocedure = \"com.example.*\"\ncall_timeout = \"2s\"\n",
        );
        let group = s.current().resolve("com.example..SUB_ev").policy;
        s.note_patterns(vec![("com.example..SUB_ev".into(), group)]);
        let concrete = s.of("com.example.a.SUB_ev").unwrap();
        assert_eq!(concrete.call_timeout, Duration::from_secs(1));
        // Not of a group here: the first rule its own name matches.
        let other = s.of("com.example.b.SUB_other").unwrap();
        assert_eq!(other.call_timeout, Duration::from_secs(2));
    }

    #[test]
    fn a_bad_reload_keeps_the_rules_and_says_why_and_a_good_one_clears_it() {
        let mut s = state("[[policy]]\nprocedure = \"a.SUB_b\"\ncall_timeout = \"1s\"\n");
        let hash = s.current().source().unwrap().hash.clone();
        let why = s
            .reload(Ok(
                "[[policy]]\nprocedure = \"a.SUB_b\"\ncall_timout = \"1s\"\n".into(),
            ))
            .unwrap_err();
        assert!(
            why.starts_with("p.toml:3: unknown key `call_timout`"),
            "{why}"
        );
        assert_eq!(s.current().source().unwrap().hash, hash);
        assert!(s.last_error().is_some());
        let missing = s.reload(Err(std::io::Error::other("gone"))).unwrap_err();
        assert_eq!(missing, "p.toml: cannot be read: gone");
        s.reload(Ok(
            "[[policy]]\nprocedure = \"a.SUB_b\"\ncall_timeout = \"2s\"\n".into(),
        ))
        .unwrap();
        assert!(s.last_error().is_none());
        assert_ne!(s.current().source().unwrap().hash, hash);
    }

    #[test]
    fn a_reload_that_orders_a_procedure_needs_partitions() {
        let context = Context {
            markers: vec!["SUB_".into()],
            max_in_flight: 256,
        };
        let policies = Policies::load("p.toml".into(), "", defaults(), &context).unwrap();
        let mut s = PolicyState::new(Arc::new(policies), context, Some(false));
        let why = s
            .reload(Ok(
                "[[policy]]\nprocedure = \"a.SUB_b\"\norder_by = \"kwarg:k\"\n".into(),
            ))
            .unwrap_err();
        assert!(why.contains("restart the instances"), "{why}");
    }
}
