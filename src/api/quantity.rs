//! Byte counts written as Kubernetes quantities (`512Mi`, `2Gi`, `500M`, `1.5Gi`): binary
//! suffixes Ki, Mi, Gi, Ti, decimal k, M, G, T, or none. The CRD's CEL rule refuses other
//! shapes; this turns them into bytes.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "{0:?} is not a quantity of bytes: use a number with an optional suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), e.g. 512Mi or 2Gi"
    )]
    Shape(String),
    #[error("{0:?} is zero: give at least one byte")]
    Zero(String),
    #[error("{0:?} is more bytes than can be counted (at most 2^64 - 1)")]
    TooLarge(String),
}

/// What the CEL rule accepts: the same shapes `parse_bytes` does.
pub const QUANTITY_PATTERN: &str = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// Bytes of a quantity; a fraction of a byte rounds up, as Kubernetes rounds.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let shape = || QuantityError::Shape(text.to_string());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let unit: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(shape()),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) if !f.is_empty() => (w, f),
        Some(_) => return Err(shape()),
        None => (number, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(shape());
    }
    // 20 digits already exceed u64: longer numbers are refused before any arithmetic.
    let whole = whole.trim_start_matches('0');
    if whole.len() > 20 {
        return Err(QuantityError::TooLarge(text.to_string()));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| shape())?
    };
    // 24 digits keep the product within u128; a digit dropped past them still rounds up.
    let (kept, dropped) = fraction.split_at(fraction.len().min(24));
    let scale = 10u128.pow(kept.len() as u32);
    let mut numerator: u128 = if kept.is_empty() {
        0
    } else {
        kept.parse().map_err(|_| shape())?
    };
    if dropped.bytes().any(|b| b != b'0') {
        numerator += 1;
    }
    let bytes = whole * unit + (numerator * unit).div_ceil(scale);
    match u64::try_from(bytes) {
        Ok(0) => Err(QuantityError::Zero(text.to_string())),
        Ok(n) => Ok(n),
        Err(_) => Err(QuantityError::TooLarge(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("1"), Ok(1));
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        assert_eq!(parse_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("3Ti"), Ok(3 << 40));
        assert_eq!(parse_bytes("5k"), Ok(5_000));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1T"), Ok(1_000_000_000_000));
    }

    #[test]
    fn fractions_round_up_to_a_whole_byte() {
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("0.5Ki"), Ok(512));
        assert_eq!(parse_bytes("1.5"), Ok(2));
        assert_eq!(parse_bytes("0.001k"), Ok(1));
        assert_eq!(parse_bytes("007Mi"), Ok(7 << 20), "leading zeros");
        assert_eq!(
            parse_bytes("1.0000000000000000000000000001"),
            Ok(2),
            "a digit past 24 still counts"
        );
    }

    #[test]
    fn other_shapes_zero_and_overflow_are_refused() {
        for bad in [
            "", "Gi", "1gi", "1GB", "1 Gi", "-1Gi", "1.Gi", ".5Gi", "1e9", "1Pi", "1Ei", "1m", "1..5",
        ] {
            assert_eq!(parse_bytes(bad), Err(QuantityError::Shape(bad.into())), "{bad:?}");
        }
        for zero in ["0", "0Gi", "0.0Mi"] {
            assert_eq!(parse_bytes(zero), Err(QuantityError::Zero(zero.into())), "{zero:?}");
        }
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
        for huge in ["18446744073709551616", "16777216Ti", "99999999999999999999999"] {
            assert_eq!(parse_bytes(huge), Err(QuantityError::TooLarge(huge.into())), "{huge:?}");
        }
    }

    #[test]
    fn the_cel_pattern_accepts_what_the_parser_does() {
        let re = regex::Regex::new(QUANTITY_PATTERN).expect("pattern");
        for text in [
            "1", "512Mi", "2Gi", "1.5Gi", "500M", "1T", "1Pi", "1GB", "1e9", ".5", "0Gi",
        ] {
            let parsed = parse_bytes(text);
            let zero = matches!(parsed, Err(QuantityError::Zero(_)));
            assert_eq!(re.is_match(text), parsed.is_ok() || zero, "{text:?}");
        }
    }
}
