//! The `config_keys!` macro: from one declaration per key it writes the section structs and their
//! defaults, [`Config`](super::Config), the list of sections and keys, the default TOML file, the
//! setter from a file's or the environment's value, and the range checks.

/// Declares every section and key. A key reads
///
/// ```text
/// /// Its doc comment.
/// name: Type = default, toml "value   # comment", read reader, check check_fn;
/// ```
///
/// - `toml "..."` is the key's line of the default file after `name = ` (comments aligned by
///   hand); `commented "..."` writes the line commented out (`# name = ...`), for an optional key.
/// - `read` names the [`Input`](super::input::Input) method that parses the value.
/// - `check` (optional) names a `fn(&Type) -> Option<String>` saying what is out of range; the
///   checks run in declaration order, so the first key out of range is the one `Config::load`
///   reports (and `Config::check_all` lists them all in that order).
macro_rules! config_keys {
    (
        header = $header:literal;
        $(
            $(#[$section_doc:meta])*
            [$section:ident] $Section:ident {
                $(
                    $(#[$key_doc:meta])*
                    $key:ident: $ty:ty = $default:expr,
                        $line:ident $toml:literal, read $read:ident $(, check $check:path)?;
                )*
            }
        )*
    ) => {
        $(
            #[doc = concat!("`[", stringify!($section), "]`.")]
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $Section {
                $( $(#[$key_doc])* pub $key: $ty, )*
            }

            impl Default for $Section {
                fn default() -> Self {
                    $Section { $( $key: $default, )* }
                }
            }
        )*

        /// The whole configuration of `herald serve`, one field per TOML section.
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct Config {
            $( $(#[$section_doc])* pub $section: $Section, )*
        }

        /// Every section and its keys, in the order API.md lists them.
        pub(super) const SECTIONS: &[(&str, &[&str])] =
            &[ $( (stringify!($section), &[ $( stringify!($key) ),* ]) ),* ];

        /// The configuration file `herald serve` runs with when given none: every key at its default,
        /// with comments. Parsing it gives [`Config::default`].
        pub const DEFAULT_TOML: &str = concat!(
            $header,
            $( "\n[", stringify!($section), "]\n", $( toml_line!($line, $key, $toml) ),* ),*
        );

        impl Config {
            /// Sets one key from a file's or the environment's value; the error says what is wrong.
            pub(super) fn set(&mut self, section: &str, key: &str, input: Input<'_>) -> Result<(), String> {
                match (section, key) {
                    $( $(
                        (stringify!($section), stringify!($key)) => self.$section.$key = input.$read()?,
                    )* )*
                    _ => return Err(format!("unknown key {section}.{key}")),
                }
                Ok(())
            }

            /// Every value out of range, in declaration order: its key and what is wrong.
            pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
                let mut problems = Vec::new();
                $( $( $(
                    if let Some(problem) = $check(&self.$section.$key) {
                        problems.push((concat!(stringify!($section), ".", stringify!($key)), problem));
                    }
                )? )* )*
                problems
            }
        }
    };
}

/// A key's line of the default file: `name = value`, or commented out.
macro_rules! toml_line {
    (toml, $key:ident, $toml:literal) => {
        concat!(stringify!($key), " = ", $toml, "\n")
    };
    (commented, $key:ident, $toml:literal) => {
        concat!("# ", stringify!($key), " = ", $toml, "\n")
    };
}

pub(super) use {config_keys, toml_line};
