//! The shapes and settings of SERE's relation losses, shared by every
//! backend's implementation of [`super::Backend::relation_losses`] (the
//! CPU's is `cpu::relation_loss`, whose documentation describes the losses).

/// Number of global (teacher) views per image.
pub const GLOBAL_VIEWS: usize = 2;

/// Temperatures and heads of the relation losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SereLossConfig {
    /// Heads of the spatial relation (the ViT's heads by default).
    pub heads: usize,
    /// Teacher temperature of the spatial relation (0.5).
    pub tau_teacher_spatial: f32,
    /// Teacher temperature of the channel relation (0.1).
    pub tau_teacher_channel: f32,
    /// Student temperature of both relations (1).
    pub tau_student: f32,
}

impl SereLossConfig {
    /// The paper's temperatures with `heads` spatial heads.
    pub fn new(heads: usize) -> Self {
        SereLossConfig {
            heads,
            tau_teacher_spatial: 0.5,
            tau_teacher_channel: 0.1,
            tau_student: 1.0,
        }
    }
}

/// Shapes of one batch of views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewShapes {
    /// Images `B`.
    pub batch: usize,
    /// Feature channels `C`.
    pub channels: usize,
    /// Patch grid `(h, w)` of a global view (`Ng = h * w`).
    pub global_hw: (usize, usize),
    /// Patch grid `(h, w)` of a local view (`Nl = h * w`).
    pub local_hw: (usize, usize),
    /// Local views per image `L`.
    pub locals: usize,
}

impl ViewShapes {
    /// Views per image, `2 + L`.
    pub fn views(&self) -> usize {
        GLOBAL_VIEWS + self.locals
    }

    /// Tokens of a global view.
    pub fn global_tokens(&self) -> usize {
        self.global_hw.0 * self.global_hw.1
    }

    /// Tokens of a local view.
    pub fn local_tokens(&self) -> usize {
        self.local_hw.0 * self.local_hw.1
    }

    /// Length of a `[2][B][Ng][C]` buffer (teacher, student globals).
    pub fn globals_len(&self) -> usize {
        GLOBAL_VIEWS * self.batch * self.global_tokens() * self.channels
    }

    /// Length of a `[L][B][Nl][C]` buffer (student locals).
    pub fn locals_len(&self) -> usize {
        self.locals * self.batch * self.local_tokens() * self.channels
    }

    /// Number of (teacher, student) view pairs per image.
    pub fn pairs_per_image(&self) -> usize {
        GLOBAL_VIEWS * (self.views() - 1)
    }

    /// `(h, w)` of view `v`.
    pub(crate) fn hw(&self, v: usize) -> (usize, usize) {
        if v < GLOBAL_VIEWS {
            self.global_hw
        } else {
            self.local_hw
        }
    }

    /// Offset and length of image `b`'s map of view `v` in its buffer.
    pub(crate) fn map_range(&self, v: usize, b: usize) -> std::ops::Range<usize> {
        let (idx, n) = if v < GLOBAL_VIEWS {
            (v * self.batch + b, self.global_tokens() * self.channels)
        } else {
            (
                (v - GLOBAL_VIEWS) * self.batch + b,
                self.local_tokens() * self.channels,
            )
        };
        idx * n..(idx + 1) * n
    }
}
