//! (kernel wrappers: rope — being written)
