//! The integration layer a VMM embeds to give assigned devices DMA access to guest memory backed
//! by KVM guest_memfd, keeping every IOMMU in step while the guest converts memory between shared
//! and private.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, missing_docs)]

pub mod attributes;
pub mod backing;
pub mod host;
pub mod policy;
mod range_set;
pub mod sys;
