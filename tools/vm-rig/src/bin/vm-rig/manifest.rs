//! `tools/vm-rig/commands.txt`: extra commands the guest runs after the tests, each with the
//! exit status it must end with. Adding a tool to the rig is one line there.
//!
//! Format, one command per line (`#` starts a comment):
//! `<name> <configurations: * or a,b> <expected exit status> <binary> [args...]`
//! where `<binary>` is a workspace binary or example (built statically with the tests).
//! Arguments are split on whitespace and cannot contain spaces.

use anyhow::{Result, bail};

/// The manifest file, relative to the vm-rig package directory.
pub const FILE: &str = "commands.txt";

/// One command to run in the guest.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    /// Its row name in the report.
    pub name: String,
    /// Configurations it runs in; `None` means every one.
    pub configs: Option<Vec<String>>,
    /// The exit status that counts as success.
    pub expect: i32,
    /// Workspace binary or example name.
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl CommandSpec {
    /// Whether this command runs in configuration `config`.
    pub fn applies_to(&self, config: &str) -> bool {
        self.configs
            .as_ref()
            .is_none_or(|list| list.iter().any(|c| c == config))
    }
}

/// Parses the manifest; `known_configs` are the configuration names a line may name.
pub fn parse(text: &str, known_configs: &[&str]) -> Result<Vec<CommandSpec>> {
    let mut specs: Vec<CommandSpec> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let words: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let [name, configs, expect, binary, args @ ..] = words.as_slice() else {
            if !words.is_empty() {
                bail!(
                    "{FILE} line {line_no}: expected `<name> <configs> <exit status> <binary> [args...]`"
                );
            }
            continue;
        };
        let configs = match *configs {
            "*" => None,
            list => {
                let names: Vec<String> = list.split(',').map(str::to_string).collect();
                if let Some(bad) = names.iter().find(|n| !known_configs.contains(&n.as_str())) {
                    bail!("{FILE} line {line_no}: no configuration named {bad:?}");
                }
                Some(names)
            }
        };
        let Ok(expect) = expect.parse() else {
            bail!("{FILE} line {line_no}: exit status {expect:?} is not a number");
        };
        if specs.iter().any(|s| s.name == *name) {
            bail!("{FILE} line {line_no}: command name {name:?} is used twice");
        }
        specs.push(CommandSpec {
            name: name.to_string(),
            configs,
            expect,
            binary: binary.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["intel-type1", "noiommu"];

    #[test]
    fn lines_become_commands_and_comments_vanish() {
        let text = "# comment\n\nprobe * 0 vm-rig probe --strict # trailing\nneg noiommu,intel-type1 2 dma-map map --bad\n";
        let specs = parse(text, KNOWN).unwrap();
        assert_eq!(
            specs[0],
            CommandSpec {
                name: "probe".into(),
                configs: None,
                expect: 0,
                binary: "vm-rig".into(),
                args: vec!["probe".into(), "--strict".into()],
            }
        );
        assert_eq!(specs[1].expect, 2);
        assert!(specs[1].applies_to("noiommu") && specs[1].applies_to("intel-type1"));
        assert!(specs[0].applies_to("anything"));
        assert_eq!(specs.len(), 2);
    }

    #[test]
    fn bad_lines_are_rejected_with_their_number() {
        for (text, needle) in [
            ("a * 0\n", "line 1"),
            ("ok * 0 x\nb virtio 0 x\n", "\"virtio\""),
            ("a * zero x\n", "not a number"),
            ("a * 0 x\na * 1 y\n", "used twice"),
        ] {
            let err = parse(text, KNOWN).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_command_limited_to_other_configs_does_not_apply() {
        let specs = parse("a noiommu 0 x\n", KNOWN).unwrap();
        assert!(!specs[0].applies_to("intel-type1"));
    }
}
