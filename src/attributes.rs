//! KVM's per-GPA memory attributes (private or shared), behind one small trait.
//!
//! The conversion engine only ever calls [`MemoryAttributes::set`]. Two implementations:
//! [`KvmAttributes`] issues `KVM_SET_MEMORY_ATTRIBUTES` on a VM with private memory;
//! [`RecordingAttributes`] keeps the table in memory, for VMs whose kernel has no
//! `KVM_CAP_MEMORY_ATTRIBUTES` (a default VM, or this project's CI host) and for tests that inject
//! failures and compare the table with the state manager.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use discard_manager::{Attribute, GpaRange};
use kvm_bindings::{KVM_MEMORY_ATTRIBUTE_PRIVATE, kvm_memory_attributes};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;

use crate::range_set::RangeSet;

/// Setting an attribute failed; KVM's table is unchanged for the range.
#[derive(Debug, thiserror::Error)]
#[error("setting {range} {attribute:?} failed")]
pub struct AttributeError {
    /// The range asked for.
    pub range: GpaRange,
    /// The attribute asked for.
    pub attribute: Attribute,
    /// The kernel's errno (or the injected one).
    #[source]
    pub source: errno::Error,
}

/// Where the private/shared attribute of guest memory is kept.
pub trait MemoryAttributes: Send + Sync + fmt::Debug {
    /// Marks every byte of `range` `attribute`. All or nothing: on error nothing changed.
    ///
    /// # Errors
    /// [`AttributeError`] with the kernel's errno.
    fn set(&self, range: GpaRange, attribute: Attribute) -> Result<(), AttributeError>;
}

/// The real thing: `KVM_SET_MEMORY_ATTRIBUTES` on a VM with private memory
/// (`KVM_X86_SW_PROTECTED_VM`, SNP, TDX).
#[derive(Debug)]
pub struct KvmAttributes {
    vm: Arc<VmFd>,
}

impl KvmAttributes {
    /// Sets attributes on `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl MemoryAttributes for KvmAttributes {
    fn set(&self, range: GpaRange, attribute: Attribute) -> Result<(), AttributeError> {
        let attributes = match attribute {
            Attribute::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
            Attribute::Shared => 0,
        };
        let args = kvm_memory_attributes {
            address: range.start(),
            size: range.len(),
            attributes,
            flags: 0,
        };
        self.vm
            .set_memory_attributes(args)
            .map_err(|source| AttributeError {
                range,
                attribute,
                source,
            })
    }
}

/// One call [`RecordingAttributes`] received, whether it succeeded or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributeCall {
    /// The range.
    pub range: GpaRange,
    /// The attribute asked for.
    pub attribute: Attribute,
    /// Whether the call succeeded.
    pub ok: bool,
}

type FailureRule = Box<dyn FnMut(GpaRange, Attribute) -> bool + Send>;

#[derive(Default)]
struct Recording {
    private: RangeSet,
    calls: Vec<AttributeCall>,
    fail: Option<FailureRule>,
}

/// An in-memory attribute table with the kernel's semantics (everything starts shared; a call
/// changes the whole range or nothing), a call log and fault injection.
#[derive(Default)]
pub struct RecordingAttributes {
    inner: Mutex<Recording>,
}

impl fmt::Debug for RecordingAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.lock();
        f.debug_struct("RecordingAttributes")
            .field("private", &r.private)
            .field("calls", &r.calls.len())
            .finish()
    }
}

impl RecordingAttributes {
    /// An empty table: every GPA shared, as KVM starts.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        crate::lock(&self.inner)
    }

    /// The attribute of the byte at `gpa`.
    pub fn attribute_at(&self, gpa: u64) -> Attribute {
        if self.lock().private.contains(gpa, gpa + 1) {
            Attribute::Private
        } else {
            Attribute::Shared
        }
    }

    /// The private extents `[start, end)`, in order.
    pub fn private_ranges(&self) -> Vec<(u64, u64)> {
        self.lock().private.iter().collect()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<AttributeCall> {
        self.lock().calls.clone()
    }

    /// From now on, a call for which `rule` returns true fails with `EIO` and changes nothing.
    pub fn inject_failures(&self, rule: impl FnMut(GpaRange, Attribute) -> bool + Send + 'static) {
        self.lock().fail = Some(Box::new(rule));
    }

    /// Stops injecting failures.
    pub fn clear_failures(&self) {
        self.lock().fail = None;
    }
}

impl MemoryAttributes for RecordingAttributes {
    fn set(&self, range: GpaRange, attribute: Attribute) -> Result<(), AttributeError> {
        let mut r = self.lock();
        let fails = r.fail.as_mut().is_some_and(|rule| rule(range, attribute));
        r.calls.push(AttributeCall {
            range,
            attribute,
            ok: !fails,
        });
        if fails {
            return Err(AttributeError {
                range,
                attribute,
                source: errno::Error::new(libc::EIO),
            });
        }
        match attribute {
            Attribute::Private => r.private.insert(range.start(), range.end()),
            Attribute::Shared => r.private.remove(range.start(), range.end()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_table_changes_all_or_nothing() {
        let t = RecordingAttributes::new();
        let r = GpaRange::new(0x1000, 0x3000).unwrap();
        t.set(r, Attribute::Private).unwrap();
        assert_eq!(t.attribute_at(0x2000), Attribute::Private);
        t.inject_failures(|_, a| a == Attribute::Shared);
        let err = t.set(r, Attribute::Shared).unwrap_err();
        assert_eq!(err.source.errno(), libc::EIO);
        assert_eq!(t.private_ranges(), [(0x1000, 0x4000)]);
        t.clear_failures();
        t.set(GpaRange::new(0x2000, 0x1000).unwrap(), Attribute::Shared)
            .unwrap();
        assert_eq!(t.private_ranges(), [(0x1000, 0x2000), (0x3000, 0x4000)]);
        assert_eq!(
            t.calls().iter().map(|c| c.ok).collect::<Vec<_>>(),
            [true, false, true]
        );
    }
}
