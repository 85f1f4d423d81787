//! Where SOFO's iterations spend their time ([`Sofo::time_phases`]).
//!
//! [`Sofo::time_phases`]: crate::optim::Sofo::time_phases

use crate::Result;
use std::sync::Mutex;
use std::time::Instant;

/// The time SOFO iterations spent in their three phases, summed over the
/// iterations run while timing was on: drawing and normalising the K
/// directions (the Gram matrix's eigenproblem included), the forward-K pass
/// with its sketch, and the step (G̃'s eigenproblem, Δ, the update). On a
/// GPU each phase ends with the device synchronised, so that a phase's
/// device work is counted in it and the three add up to the iterations'
/// wall time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SofoPhases {
    pub iterations: u64,
    pub draw_s: f64,
    pub pass_s: f64,
    pub step_s: f64,
}

/// Whether an optimiser times its iterations' phases, and the sums.
#[derive(Default)]
pub(crate) struct PhaseClock {
    on: bool,
    sums: SofoPhases,
}

impl PhaseClock {
    /// Timing on (the sums from zero) or off.
    pub(crate) fn set(&mut self, on: bool) {
        if on {
            self.sums = SofoPhases::default();
        }
        self.on = on;
    }

    pub(crate) fn sums(&self) -> SofoPhases {
        self.sums
    }
}

/// One iteration's laps: nothing while its optimiser's timing is off.
pub(crate) struct Laps<'a> {
    clock: Option<(&'a Mutex<PhaseClock>, Instant)>,
}

impl<'a> Laps<'a> {
    /// Starts the iteration's first phase (after `sync`, which waits for the
    /// device's earlier work, where timing is on).
    pub(crate) fn start(
        clock: &'a Mutex<PhaseClock>,
        sync: impl FnOnce() -> Result<()>,
    ) -> Result<Self> {
        if !clock.lock().unwrap_or_else(|e| e.into_inner()).on {
            return Ok(Laps { clock: None });
        }
        sync()?;
        Ok(Laps {
            clock: Some((clock, Instant::now())),
        })
    }

    /// Ends a phase once `sync` has waited for its device work: `add` puts
    /// its seconds where they belong.
    pub(crate) fn lap(
        &mut self,
        sync: impl FnOnce() -> Result<()>,
        add: impl FnOnce(&mut SofoPhases, f64),
    ) -> Result<()> {
        let Some((clock, since)) = &mut self.clock else {
            return Ok(());
        };
        sync()?;
        let now = Instant::now();
        let seconds = now.duration_since(*since).as_secs_f64();
        *since = now;
        add(
            &mut clock.lock().unwrap_or_else(|e| e.into_inner()).sums,
            seconds,
        );
        Ok(())
    }

    /// Ends the last phase, the step, and counts the iteration.
    pub(crate) fn end_iteration(&mut self, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        self.lap(sync, |s, t| {
            s.step_s += t;
            s.iterations += 1;
        })
    }
}
