//! What several test files of this crate share.

use sofo_ad::{Float, Ops, Result, Unary};

/// Every elementwise op of the vocabulary on inputs (a, b, c, d, e), three
/// outputs; the last of d and e alone. Defined wherever b is (log and sqrt
/// see b² + 0.5, the division divides by it).
pub fn every_op<T: Float, E: Ops<T>>(e: &mut E, x: &[E::V]) -> Result<Vec<E::V>> {
    let [a, b, c, d, f] = [&x[0], &x[1], &x[2], &x[3], &x[4]];
    let pos = e.square(b)?;
    let pos = e.add_scalar(&pos, 0.5)?;
    let mut acc = a.clone();
    for op in Unary::all(0.3, -1.7) {
        let arg = if matches!(op, Unary::Log | Unary::Sqrt) {
            &pos
        } else {
            c
        };
        let y = e.unary(arg, op)?;
        acc = e.add(&acc, &y)?;
    }
    let p = e.mul(&acc, d)?;
    let q = e.div(&p, &pos)?;
    let r = e.sub(&q, a)?;
    let de = e.mul(d, f)?;
    Ok(vec![r, p, de])
}
