use std::fmt;

/// Errors of the sofo crate.
#[derive(Debug)]
pub enum Error {
    /// From the tensor or differentiation layer.
    Tensor(sofo_tensor::TensorError),
    /// A setting outside its allowed range: names the field, the value and
    /// what is allowed.
    Config {
        field: String,
        value: String,
        allowed: String,
    },
    /// A checkpoint that cannot be read or written.
    Checkpoint(String),
    /// A loss or curvature that is not finite.
    NonFinite(String),
    Io(std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(
        field: impl Into<String>,
        value: impl fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Config {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Tensor(e) => write!(f, "{e}"),
            Error::Config {
                field,
                value,
                allowed,
            } => write!(f, "invalid value {value} for `{field}`: allowed {allowed}"),
            Error::Checkpoint(m) => write!(f, "checkpoint: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite value: {m}"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<sofo_tensor::TensorError> for Error {
    fn from(e: sofo_tensor::TensorError) -> Self {
        Error::Tensor(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
