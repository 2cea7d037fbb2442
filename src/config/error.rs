//! The configuration error: every bad variable at once, each by name, with
//! secrets and URL passwords already hidden so it is safe to print.

use std::fmt;

/// One variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The name that was set (an old name such as `REALM` when that was used).
    pub variable: &'static str,
    /// The value as set, `None` when the problem is that it is missing.
    /// Secrets read `***`; URL passwords are replaced by `***`.
    pub value: Option<String>,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            // `{:?}` quotes the value and makes stray whitespace visible.
            Some(value) => write!(f, "{}={value:?}: {}", self.variable, self.message),
            None => write!(f, "{}: {}", self.variable, self.message),
        }
    }
}

/// The environment holds values subtocall cannot start with. `Display` prints
/// one problem per line; `main` prints that and exits with code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", one_per_line(.problems))]
pub struct ConfigError {
    problems: Vec<Problem>,
}

impl ConfigError {
    pub(crate) fn new(problems: Vec<Problem>) -> ConfigError {
        ConfigError { problems }
    }

    /// Every problem found, in the order the variables are read.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

fn one_per_line(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
