//! A crate whose tests fail on purpose: ci/selftest-runner checks that ci/cargo-test says so.

#[cfg(test)]
mod tests {
    #[test]
    fn fails_on_purpose() {
        assert_eq!(1 + 1, 3, "this failure is expected by ci/selftest-runner");
    }

    #[test]
    fn passes() {}
}
