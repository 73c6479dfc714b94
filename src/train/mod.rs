//! LoRA training on a frozen int8 base (DESIGN.md §3): the trainable parameters on a backend,
//! one micro-batch forward + backward, the optimizer schedule, and the training loop.

pub mod data;
pub mod optim;
pub mod params;
pub mod step;
pub mod trainer;

pub use data::{DataOrder, Example};
pub use params::DevAdapter;
pub use step::{forward_backward, logits_at, Batch, LoraRun, StepLoss, Workspace};
pub use trainer::{check_checkpoint_dir, check_resume_dir, StepRecord, TrainConfig, Trainer};
