//! Exact decimal text from Kafka Connect's `Decimal` encoding: a big-endian
//! two's-complement unscaled integer plus a scale.
//!
//! Postgres `numeric` values can be far wider than 128 bits, so this works on
//! byte strings of any (capped) length and never goes through floats.

use std::fmt::Write as _;

use super::EventError;

/// Largest accepted scale, either way. Postgres keeps at most 16383 digits
/// after the point (and declared scales lie within ±1000), so no real value is
/// refused, while a hostile scale cannot make us allocate without bound.
pub(crate) const MAX_SCALE: i64 = 16_383;

/// Longest accepted unscaled integer, in bytes. The widest Postgres `numeric`
/// has 131072 + 16383 digits, which needs 61,231 bytes with the sign byte;
/// the cap also bounds the quadratic digit conversion.
pub(crate) const MAX_UNSCALED_BYTES: usize = 61_440;

/// Renders `unscaled × 10^-scale` as plain decimal text such as `-12.30`.
///
/// Trailing zeros implied by the scale are kept (`0.00` for zero at scale 2),
/// as Java's `BigDecimal.toPlainString` does. A negative scale appends zeros.
pub(crate) fn decimal_text(unscaled: &[u8], scale: i64) -> Result<String, EventError> {
    if !(-MAX_SCALE..=MAX_SCALE).contains(&scale) {
        return Err(EventError::Invalid(format!(
            "decimal scale {scale} is outside -{MAX_SCALE}..={MAX_SCALE}"
        )));
    }
    if unscaled.is_empty() {
        // Java's BigInteger refuses zero-length input too, so no encoder emits it.
        return Err(EventError::Invalid("empty decimal value".into()));
    }
    if unscaled.len() > MAX_UNSCALED_BYTES {
        return Err(EventError::Invalid(format!(
            "decimal value of {} bytes exceeds the limit of {MAX_UNSCALED_BYTES}",
            unscaled.len()
        )));
    }
    let negative = unscaled[0] & 0x80 != 0;
    let digits = if negative {
        magnitude_digits(&negate(unscaled))
    } else {
        magnitude_digits(unscaled)
    };
    Ok(place_point(&digits, negative, scale))
}

/// Two's-complement negation, which turns a negative value into its magnitude.
/// The magnitude always fits the same width (at most 2^(8n-1)), read unsigned.
fn negate(bytes: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = bytes.iter().map(|byte| !byte).collect();
    for byte in out.iter_mut().rev() {
        let (sum, carry) = byte.overflowing_add(1);
        *byte = sum;
        if !carry {
            break;
        }
    }
    out
}

/// Decimal digits of an unsigned big-endian integer, without leading zeros.
///
/// Repeatedly divides 32-bit limbs by 10^9, collecting nine digits per pass.
fn magnitude_digits(magnitude: &[u8]) -> String {
    const CHUNK: u64 = 1_000_000_000;
    let mut limbs: Vec<u32> = magnitude
        .rchunks(4)
        .rev()
        .map(|chunk| {
            chunk
                .iter()
                .fold(0u32, |acc, &byte| (acc << 8) | u32::from(byte))
        })
        .collect();
    let mut first_nonzero = limbs
        .iter()
        .position(|&limb| limb != 0)
        .unwrap_or(limbs.len());
    // Base-10^9 chunks, least significant first.
    let mut chunks: Vec<u32> = Vec::new();
    while first_nonzero < limbs.len() {
        let mut remainder: u64 = 0;
        for limb in &mut limbs[first_nonzero..] {
            let current = (remainder << 32) | u64::from(*limb);
            // remainder < 10^9, so the quotient fits 32 bits.
            *limb = (current / CHUNK) as u32;
            remainder = current % CHUNK;
        }
        chunks.push(remainder as u32);
        while first_nonzero < limbs.len() && limbs[first_nonzero] == 0 {
            first_nonzero += 1;
        }
    }
    let Some((most_significant, rest)) = chunks.split_last() else {
        return "0".into();
    };
    let mut digits = String::with_capacity(chunks.len() * 9);
    let _ = write!(digits, "{most_significant}");
    for chunk in rest.iter().rev() {
        let _ = write!(digits, "{chunk:09}");
    }
    digits
}

/// Inserts the decimal point `scale` digits from the right (or appends zeros
/// for a negative scale) and adds the sign.
fn place_point(digits: &str, negative: bool, scale: i64) -> String {
    let sign = if negative { "-" } else { "" };
    let scale_digits = scale.unsigned_abs() as usize;
    if scale <= 0 {
        if digits == "0" {
            return "0".into();
        }
        return format!("{sign}{digits}{}", "0".repeat(scale_digits));
    }
    let padding = (scale_digits + 1).saturating_sub(digits.len());
    let padded = format!("{}{digits}", "0".repeat(padding));
    let (whole, fraction) = padded.split_at(padded.len() - scale_digits);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    /// Minimal two's-complement big-endian bytes of an i128, as Java's
    /// `BigInteger.toByteArray` produces them.
    fn twos_complement(value: i128) -> Vec<u8> {
        let bytes = value.to_be_bytes();
        let mut start = 0;
        while start < 15 {
            let redundant = (bytes[start] == 0x00 && bytes[start + 1] & 0x80 == 0)
                || (bytes[start] == 0xFF && bytes[start + 1] & 0x80 != 0);
            if !redundant {
                break;
            }
            start += 1;
        }
        bytes[start..].to_vec()
    }

    /// An independent, slow conversion: multiply-and-add on decimal digits.
    fn slow_signed_digits(bytes: &[u8]) -> String {
        let negative = bytes.first().is_some_and(|byte| byte & 0x80 != 0);
        let magnitude = if negative {
            negate(bytes)
        } else {
            bytes.to_vec()
        };
        let mut digits_le: Vec<u32> = vec![0];
        for byte in magnitude {
            let mut carry = u32::from(byte);
            for digit in digits_le.iter_mut() {
                let value = *digit * 256 + carry;
                *digit = value % 10;
                carry = value / 10;
            }
            while carry > 0 {
                digits_le.push(carry % 10);
                carry /= 10;
            }
        }
        while digits_le.len() > 1 && digits_le.last() == Some(&0) {
            digits_le.pop();
        }
        let text: String = digits_le
            .iter()
            .rev()
            .map(|d| char::from(b'0' + *d as u8))
            .collect();
        if negative { format!("-{text}") } else { text }
    }

    #[test]
    fn event_decimal_known_values() {
        assert_eq!(decimal_text(&[0xFB, 0x32], 2).unwrap(), "-12.30");
        assert_eq!(decimal_text(&[0x05], 2).unwrap(), "0.05");
        assert_eq!(decimal_text(&[0x04, 0xD2], 0).unwrap(), "1234");
        assert_eq!(decimal_text(&[0x00], 0).unwrap(), "0");
        assert_eq!(decimal_text(&[0x00], 2).unwrap(), "0.00");
        assert_eq!(decimal_text(&[0xFF], 0).unwrap(), "-1");
        assert_eq!(decimal_text(&[0xFF], 3).unwrap(), "-0.001");
        assert_eq!(decimal_text(&[0x80], 0).unwrap(), "-128");
        assert_eq!(decimal_text(&[0x7F], 1).unwrap(), "12.7");
    }

    #[test]
    fn event_decimal_leading_sign_bytes_do_not_matter() {
        assert_eq!(decimal_text(&[0x00, 0x00, 0x00, 0x80], 1).unwrap(), "12.8");
        assert_eq!(decimal_text(&[0xFF, 0xFF, 0xFF, 0x80], 1).unwrap(), "-12.8");
        assert_eq!(
            decimal_text(&[0x00, 0x00, 0x00, 0x00, 0x00], 0).unwrap(),
            "0"
        );
    }

    #[test]
    fn event_decimal_wider_than_128_bits() {
        let mut two_pow_128 = vec![0x01];
        two_pow_128.extend([0u8; 16]);
        assert_eq!(
            decimal_text(&two_pow_128, 0).unwrap(),
            "340282366920938463463374607431768211456"
        );
        assert_eq!(
            decimal_text(&two_pow_128, 5).unwrap(),
            "3402823669209384634633746074317682.11456"
        );
        let mut minus_two_pow_128 = vec![0xFF];
        minus_two_pow_128.extend([0u8; 16]);
        assert_eq!(
            decimal_text(&minus_two_pow_128, 0).unwrap(),
            "-340282366920938463463374607431768211456"
        );
        let ten_pow_40 = [
            0x1d, 0x63, 0x29, 0xf1, 0xc3, 0x5c, 0xa4, 0xbf, 0xab, 0xb9, 0xf5, 0x61, 0x00, 0x00,
            0x00, 0x00, 0x00,
        ];
        assert_eq!(
            decimal_text(&ten_pow_40, 40).unwrap(),
            "1.0000000000000000000000000000000000000000"
        );
        let minus_nines = [
            0xe2, 0x9c, 0xd6, 0x0e, 0x3c, 0xa3, 0x5b, 0x40, 0x54, 0x46, 0x0a, 0x9f, 0x00, 0x00,
            0x00, 0x00, 0x01,
        ];
        assert_eq!(
            decimal_text(&minus_nines, 20).unwrap(),
            "-99999999999999999999.99999999999999999999"
        );
    }

    #[test]
    fn event_decimal_negative_scale_appends_zeros() {
        assert_eq!(decimal_text(&[0x0C], -3).unwrap(), "12000");
        assert_eq!(decimal_text(&[0xF4], -2).unwrap(), "-1200");
        assert_eq!(decimal_text(&[0x00], -2).unwrap(), "0");
    }

    #[test]
    fn event_decimal_limits() {
        assert_eq!(
            decimal_text(&[1], 1_000_000_000),
            Err(EventError::Invalid(
                "decimal scale 1000000000 is outside -16383..=16383".into()
            ))
        );
        assert!(decimal_text(&[1], -16_384).is_err());
        assert_eq!(decimal_text(&[1], 16_383).unwrap().len(), 16_385);
        assert_eq!(
            decimal_text(&[], 0),
            Err(EventError::Invalid("empty decimal value".into()))
        );
        assert_eq!(
            decimal_text(&vec![1; MAX_UNSCALED_BYTES + 1], 0),
            Err(EventError::Invalid(
                "decimal value of 61441 bytes exceeds the limit of 61440".into()
            ))
        );
    }

    #[test]
    fn event_decimal_widest_postgres_numeric_fits() {
        // 10^147455 - 1: every digit a 9, the most digits Postgres can store.
        let mut bytes = vec![0u8; MAX_UNSCALED_BYTES];
        bytes[0] = 0x7F;
        bytes[1..].fill(0xFF);
        let text = decimal_text(&bytes, 16_383).unwrap();
        assert!(text.len() > 147_455, "{}", text.len());
    }

    proptest! {
        #[test]
        fn event_decimal_matches_rust_decimal(
            mantissa in -(1i128 << 95)..(1i128 << 95),
            scale in 0u32..=28,
        ) {
            let expected = Decimal::from_i128_with_scale(mantissa, scale).to_string();
            let actual = decimal_text(&twos_complement(mantissa), i64::from(scale)).unwrap();
            prop_assert_eq!(actual, expected);
        }

        #[test]
        fn event_decimal_matches_slow_conversion(
            bytes in prop::collection::vec(any::<u8>(), 1..80),
        ) {
            prop_assert_eq!(decimal_text(&bytes, 0).unwrap(), slow_signed_digits(&bytes));
        }
    }
}
