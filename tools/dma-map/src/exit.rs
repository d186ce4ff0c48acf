//! Exit codes: every error a command returns is classified once, here, and `main` turns the
//! class into the process exit code documented in `--help` ([`crate::cli::EXIT_CODES`]).

use std::fmt;

/// The class of a failure, which decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A workload, device test or invariant check failed (exit 1).
    Failed,
    /// Bad arguments or a bad input file (exit 2, like clap's own usage errors).
    Usage,
    /// The host lacks a feature or device the command needs (exit 3).
    HostLacks,
}

impl Class {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Class::Failed => 1,
            Class::Usage => 2,
            Class::HostLacks => 3,
        }
    }
}

/// Exit code of an error nobody classified: a system call failed unexpectedly.
pub const UNEXPECTED: u8 = 4;

/// An error marked with its [`Class`]; the message is a sentence saying what to do.
#[derive(Debug)]
pub struct Classified {
    /// The class.
    pub class: Class,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Classified {}

/// An error of class `class` with `message`.
pub fn error(class: Class, message: impl Into<String>) -> anyhow::Error {
    Classified {
        class,
        message: message.into(),
    }
    .into()
}

/// The exit code for `e`: the class of the outermost classified error in its chain, else
/// [`UNEXPECTED`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<Classified>())
        .map_or(UNEXPECTED, |c| c.class.code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn classified_errors_keep_their_code_under_added_context() {
        let e = Err::<(), _>(error(Class::HostLacks, "no VFIO"))
            .context("mapping the device")
            .unwrap_err();
        assert_eq!(code_of(&e), 3);
        assert_eq!(code_of(&anyhow::anyhow!("EIO")), UNEXPECTED);
        assert_eq!(code_of(&error(Class::Usage, "bad")), 2);
        assert_eq!(code_of(&error(Class::Failed, "bad")), 1);
    }
}
