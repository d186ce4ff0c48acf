//! A driver for QEMU's `edu` test device (PCI 1234:11e8): enough of it to make the device DMA
//! to and from memory, which is how the real-kernel tests prove that a mapping reaches memory
//! and that an unmapped range does not.
//!
//! Registers (BAR0, QEMU `hw/misc/edu.c`): 0x00 identification (`0x010000ed`), 0x80 DMA source,
//! 0x88 DMA destination, 0x90 count, 0x98 command (bit 0 start, bit 1 device-to-RAM, bit 2
//! raise an interrupt). The device's own buffer is at 0x40000 and holds 4096 bytes, but QEMU
//! 7.2 checks the range with an off-by-one (a full 4096-byte DMA aborts QEMU), so one DMA moves
//! at most [`Edu::MAX_DMA`] bytes. The device masks DMA addresses to 28 bits by default
//! (addresses above 256 MiB are silently wrapped, so they are refused here instead).
//!
//! Registers are written 32 bits at a time: edu takes a 4-byte write at 0x80/0x88 as the whole
//! address, and not every kernel's vfio-pci forwards 8-byte BAR accesses.

use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};

use super::{DeviceRegionError, DeviceRegions};

const REG_ID: u64 = 0x00;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
const CMD_START: u32 = 1 << 0;
const CMD_TO_RAM: u32 = 1 << 1;
/// The device-side address of edu's DMA buffer.
const DEVICE_BUFFER: u32 = 0x4_0000;
/// PCI config space: the command register, its memory-decode and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// What edu's identification register holds (version 1.0, "ed").
pub const EDU_ID: u32 = 0x0100_00ed;

/// An edu operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EduError {
    /// Reading or writing a register failed.
    #[error("edu: {what}")]
    Region {
        /// Which register access.
        what: &'static str,
        /// The access error.
        #[source]
        source: DeviceRegionError,
    },
    /// The identification register is not edu's.
    #[error(
        "not an edu device: identification register holds {found:#010x}, expected {EDU_ID:#010x}"
    )]
    NotEdu {
        /// What the register held.
        found: u32,
    },
    /// The length is 0 or more than one DMA may move.
    #[error("edu: a DMA moves 1..={max} bytes, not {len}")]
    BadLength {
        /// Length asked for.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// The bus address range does not fit the device's DMA mask.
    #[error("edu: bus address {bus_addr:#x} + {len:#x} exceeds the device's DMA mask {mask:#x}")]
    BeyondDmaMask {
        /// Bus address asked for.
        bus_addr: u64,
        /// Length.
        len: u32,
        /// The device's mask.
        mask: u64,
    },
    /// The DMA did not finish in time.
    #[error("edu: DMA still running after {waited:?} (command register {command:#x})")]
    Timeout {
        /// How long it was polled.
        waited: Duration,
        /// The last command register value.
        command: u32,
    },
}

/// The edu device behind some [`DeviceRegions`] (a type1/IOMMUFD `VfioPciDevice` or a
/// no-IOMMU device).
#[derive(Debug)]
pub struct Edu<R> {
    regions: R,
    dma_mask: u64,
    timeout: Duration,
}

impl<R: DeviceRegions> Edu<R> {
    /// Most bytes one DMA may move (QEMU 7.2's off-by-one makes 4096 abort; 2048 is known good).
    pub const MAX_DMA: u32 = 2048;
    /// QEMU's default `dma_mask` property: 28 bits.
    pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

    /// Turns on memory decode and bus mastering, then checks the identification register.
    ///
    /// # Errors
    /// [`EduError::NotEdu`] for another device; [`EduError::Region`] when BAR0 or config
    /// space cannot be accessed.
    pub fn new(regions: R) -> Result<Edu<R>, EduError> {
        let edu = Edu {
            regions,
            dma_mask: Self::DEFAULT_DMA_MASK,
            timeout: Duration::from_secs(10),
        };
        // vfio-pci refuses BAR accesses while memory decode is off. Bus mastering (which lets
        // the device DMA) is turned on only once the device proved to be edu.
        edu.set_command_bits(PCI_COMMAND_MEMORY)?;
        let found = edu.read32(REG_ID, "reading the identification register")?;
        if found != EDU_ID {
            return Err(EduError::NotEdu { found });
        }
        edu.set_command_bits(PCI_COMMAND_MASTER)?;
        Ok(edu)
    }

    /// Uses another DMA mask (QEMU's `-device edu,dma_mask=...`).
    pub fn with_dma_mask(mut self, mask: u64) -> Self {
        self.dma_mask = mask;
        self
    }

    /// Sets how long a DMA may run before [`EduError::Timeout`] (10 s by default; QEMU runs
    /// each DMA from a 100 ms timer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The regions this driver uses.
    pub fn regions(&self) -> &R {
        &self.regions
    }

    /// DMA `len` bytes from memory at `bus_addr` (an IOVA, or a physical address in no-IOMMU
    /// mode) into the device's buffer, and waits for it to finish.
    ///
    /// # Errors
    /// A bad length or address, a register access that fails, or a DMA that does not finish.
    pub fn copy_to_device(&self, bus_addr: u64, len: u32) -> Result<(), EduError> {
        let src = self.bus_addr(bus_addr, len)?;
        self.dma(src, DEVICE_BUFFER, len, CMD_START)
    }

    /// DMA `len` bytes from the device's buffer to memory at `bus_addr`, and waits.
    ///
    /// # Errors
    /// As [`Edu::copy_to_device`].
    pub fn copy_from_device(&self, bus_addr: u64, len: u32) -> Result<(), EduError> {
        let dst = self.bus_addr(bus_addr, len)?;
        self.dma(DEVICE_BUFFER, dst, len, CMD_START | CMD_TO_RAM)
    }

    /// Checks the length and that the whole range fits the DMA mask (and 32 bits, since the
    /// address registers are written 32 bits wide).
    fn bus_addr(&self, bus_addr: u64, len: u32) -> Result<u32, EduError> {
        if len == 0 || len > Self::MAX_DMA {
            return Err(EduError::BadLength {
                len,
                max: Self::MAX_DMA,
            });
        }
        let mask = self.dma_mask & u64::from(u32::MAX);
        let last = bus_addr.checked_add(u64::from(len) - 1);
        match last {
            Some(last) if last & !mask == 0 => Ok(bus_addr as u32),
            _ => Err(EduError::BeyondDmaMask {
                bus_addr,
                len,
                mask,
            }),
        }
    }

    fn dma(&self, src: u32, dst: u32, len: u32, command: u32) -> Result<(), EduError> {
        self.write32(REG_DMA_SRC, src, "writing the DMA source")?;
        self.write32(REG_DMA_DST, dst, "writing the DMA destination")?;
        self.write32(REG_DMA_COUNT, len, "writing the DMA count")?;
        self.write32(REG_DMA_CMD, command, "starting the DMA")?;
        let started = Instant::now();
        loop {
            let now = self.read32(REG_DMA_CMD, "polling the DMA command register")?;
            if now & CMD_START == 0 {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited > self.timeout {
                return Err(EduError::Timeout {
                    waited,
                    command: now,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn set_command_bits(&self, bits: u16) -> Result<(), EduError> {
        let mut command = [0u8; 2];
        self.regions
            .read_region(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &mut command)
            .map_err(|source| EduError::Region {
                what: "reading the PCI command register",
                source,
            })?;
        let command = u16::from_le_bytes(command) | bits;
        self.regions
            .write_region(
                VFIO_PCI_CONFIG_REGION_INDEX,
                PCI_COMMAND,
                &command.to_le_bytes(),
            )
            .map_err(|source| EduError::Region {
                what: "writing the PCI command register",
                source,
            })
    }

    fn read32(&self, reg: u64, what: &'static str) -> Result<u32, EduError> {
        let mut word = [0u8; 4];
        self.regions
            .read_region(VFIO_PCI_BAR0_REGION_INDEX, reg, &mut word)
            .map_err(|source| EduError::Region { what, source })?;
        Ok(u32::from_le_bytes(word))
    }

    fn write32(&self, reg: u64, value: u32, what: &'static str) -> Result<(), EduError> {
        self.regions
            .write_region(VFIO_PCI_BAR0_REGION_INDEX, reg, &value.to_le_bytes())
            .map_err(|source| EduError::Region { what, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::DeviceRegionInfo;
    use std::cell::RefCell;
    use std::fs::File;
    use std::os::fd::{AsFd, BorrowedFd};
    use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

    /// A software edu: BAR0 and config space in memory, DMA completing at once. Records every
    /// register write so tests can check the programming sequence.
    struct FakeEdu {
        null: File,
        id: u32,
        config: std::rc::Rc<RefCell<[u8; 256]>>,
        writes: RefCell<Vec<(u64, u32)>>,
        busy_polls: RefCell<u32>,
    }

    impl FakeEdu {
        fn new(id: u32) -> FakeEdu {
            FakeEdu {
                null: File::open("/dev/null").unwrap(),
                id,
                config: std::rc::Rc::new(RefCell::new([0; 256])),
                writes: RefCell::new(Vec::new()),
                busy_polls: RefCell::new(0),
            }
        }
    }

    impl DeviceRegions for FakeEdu {
        fn region(&self, index: u32) -> Option<DeviceRegionInfo> {
            let flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            match index {
                0 => Some(DeviceRegionInfo {
                    offset: 0,
                    size: 1 << 20,
                    flags,
                }),
                7 => Some(DeviceRegionInfo {
                    offset: 0,
                    size: 256,
                    flags,
                }),
                _ => None,
            }
        }
        fn device_fd(&self) -> BorrowedFd<'_> {
            self.null.as_fd()
        }
        fn read_region(
            &self,
            index: u32,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), DeviceRegionError> {
            match index {
                7 => buf.copy_from_slice(&self.config.borrow()[offset as usize..][..buf.len()]),
                _ if offset == REG_ID => buf.copy_from_slice(&self.id.to_le_bytes()),
                _ if offset == REG_DMA_CMD => {
                    let mut busy = self.busy_polls.borrow_mut();
                    let v: u32 = if *busy > 0 {
                        *busy -= 1;
                        CMD_START
                    } else {
                        0
                    };
                    buf.copy_from_slice(&v.to_le_bytes());
                }
                _ => buf.fill(0),
            }
            Ok(())
        }
        fn write_region(
            &self,
            index: u32,
            offset: u64,
            buf: &[u8],
        ) -> Result<(), DeviceRegionError> {
            if index == 7 {
                self.config.borrow_mut()[offset as usize..][..buf.len()].copy_from_slice(buf);
            } else {
                let v = u32::from_le_bytes(buf.try_into().unwrap());
                self.writes.borrow_mut().push((offset, v));
            }
            Ok(())
        }
    }

    #[test]
    fn new_checks_the_id_and_sets_bus_master() {
        let edu = Edu::new(FakeEdu::new(EDU_ID)).unwrap();
        assert_eq!(edu.regions().config.borrow()[4] & 0x6, 0x6);
        let other = FakeEdu::new(0x1234);
        let config = other.config.clone();
        match Edu::new(other) {
            Err(EduError::NotEdu { found }) => assert_eq!(found, 0x1234),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a device with another id was accepted"),
        }
        assert_eq!(
            config.borrow()[4] & 0x4,
            0,
            "bus master enabled on a device that is not edu"
        );
    }

    #[test]
    fn dma_programs_source_destination_count_then_command() {
        let edu = Edu::new(FakeEdu::new(EDU_ID)).unwrap();
        *edu.regions().busy_polls.borrow_mut() = 3;
        edu.copy_to_device(0x10_0000, 2048).unwrap();
        edu.copy_from_device(0x20_0000, 16).unwrap();
        assert_eq!(
            *edu.regions().writes.borrow(),
            [
                (REG_DMA_SRC, 0x10_0000),
                (REG_DMA_DST, DEVICE_BUFFER),
                (REG_DMA_COUNT, 2048),
                (REG_DMA_CMD, CMD_START),
                (REG_DMA_SRC, DEVICE_BUFFER),
                (REG_DMA_DST, 0x20_0000),
                (REG_DMA_COUNT, 16),
                (REG_DMA_CMD, CMD_START | CMD_TO_RAM),
            ]
        );
        assert_eq!(*edu.regions().busy_polls.borrow(), 0, "polled until done");
    }

    #[test]
    fn bad_lengths_and_addresses_are_refused_before_touching_the_device() {
        let edu = Edu::new(FakeEdu::new(EDU_ID)).unwrap();
        assert!(matches!(
            edu.copy_to_device(0, 0),
            Err(EduError::BadLength { .. })
        ));
        assert!(matches!(
            edu.copy_to_device(0, 2049),
            Err(EduError::BadLength { .. })
        ));
        // Last byte at 256 MiB: one past the 28-bit mask.
        assert!(matches!(
            edu.copy_from_device((1 << 28) - 8, 16),
            Err(EduError::BeyondDmaMask { .. })
        ));
        assert!(matches!(
            edu.copy_from_device(u64::MAX - 4, 16),
            Err(EduError::BeyondDmaMask { .. })
        ));
        assert!(edu.regions().writes.borrow().is_empty());
        let wide = edu.with_dma_mask(u64::MAX);
        wide.copy_from_device((1 << 28) - 8, 16).unwrap();
        // Still limited to what a 32-bit register write can carry.
        assert!(matches!(
            wide.copy_from_device(1 << 32, 16),
            Err(EduError::BeyondDmaMask { .. })
        ));
    }

    #[test]
    fn a_dma_that_never_finishes_times_out() {
        let edu = Edu::new(FakeEdu::new(EDU_ID))
            .unwrap()
            .with_timeout(Duration::from_millis(20));
        *edu.regions().busy_polls.borrow_mut() = u32::MAX;
        assert!(matches!(
            edu.copy_to_device(0x1000, 8),
            Err(EduError::Timeout { command, .. }) if command & CMD_START != 0
        ));
    }
}
