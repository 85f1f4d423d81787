use std::fmt;

/// Errors of the tensor layer. Each names the operation and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorError {
    /// Shapes that do not fit together.
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
    /// An argument outside its allowed range (axis, slice bounds, ...).
    Argument { op: &'static str, message: String },
    /// Stored data of the wrong element type.
    DType {
        op: &'static str,
        expected: &'static str,
        got: String,
    },
    /// A numerical routine that did not converge or met a non-finite value.
    Numerical { op: &'static str, message: String },
    /// The GPU backend: no device, a driver or library error.
    Device { op: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, TensorError>;

impl TensorError {
    pub fn shape(op: &'static str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        TensorError::Shape {
            op,
            expected: expected.into(),
            got: got.into(),
        }
    }
    pub fn arg(op: &'static str, message: impl Into<String>) -> Self {
        TensorError::Argument {
            op,
            message: message.into(),
        }
    }
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorError::Shape { op, expected, got } => {
                write!(f, "{op}: expected shape {expected}, got {got}")
            }
            TensorError::Argument { op, message } => write!(f, "{op}: {message}"),
            TensorError::DType { op, expected, got } => {
                write!(f, "{op}: expected dtype {expected}, got {got}")
            }
            TensorError::Numerical { op, message } => write!(f, "{op}: {message}"),
            TensorError::Device { op, message } => write!(f, "{op} (cuda): {message}"),
        }
    }
}

impl std::error::Error for TensorError {}
