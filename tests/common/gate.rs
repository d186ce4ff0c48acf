//! A listener that holds a conversion inside its transaction until the test lets it go.

use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use discard_manager::{GpaRange, ListenerError, View, ViewListener};

use gmem_dma::Region;

/// A listener whose first populate waits until the test lets it go, so requests pile up.
pub struct Gate {
    entered: Sender<()>,
    release: Receiver<()>,
    once: Mutex<bool>,
}

impl ViewListener for Gate {
    fn populate(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        let mut first = self.once.lock().unwrap();
        if !*first {
            *first = true;
            self.entered.send(()).unwrap();
            self.release.recv().unwrap();
        }
        Ok(())
    }
    fn discard(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        Ok(())
    }
}

/// Gates `region`: the first populate of its shared view blocks; returns the channel that
/// says it entered and the one that releases it.
pub fn gated(region: &Region) -> (Receiver<()>, Sender<()>) {
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded(1);
    let gate = Arc::new(Gate {
        entered: entered_tx,
        release: release_rx,
        once: Mutex::new(false),
    });
    region
        .state()
        .register(View::Shared, region.range(), gate)
        .unwrap();
    (entered, release)
}
