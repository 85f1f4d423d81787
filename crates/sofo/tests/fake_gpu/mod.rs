//! Builds the fake GPU of `fakecuda.cpp` for tests (included by the tests
//! that run the device path without a GPU: `mod fake_gpu;`, or with
//! `#[path]` from another crate), and compiles C++ for the host-side
//! kernel checks.

/// The body `{ … }` that starts at the first `{` of `s` (brace matching),
/// and the rest of `s` after it.
fn body(s: &str) -> (&str, &str) {
    let start = s.find('{').expect("a body");
    let mut depth = 0;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return (&s[start..=start + i], &s[start + i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in the kernel source")
}

/// The name before the first `(` of `s`.
fn name_before_paren(s: &str) -> &str {
    let head = &s[..s.find('(').expect("a parameter list")];
    head.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap()
}

/// `src` with `EMU_SHARED(name);` after each `__shared__` declaration, for
/// every array it declares: the fake GPU NaN-fills those arrays before each
/// block, as a block's shared memory starts out unspecified on a GPU (and a
/// host static would otherwise hold the previous block's values).
fn register_shared(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        out.push_str(line);
        out.push('\n');
        let Some(decl) = line.trim_start().strip_prefix("__shared__ ") else {
            continue;
        };
        // the type, then the arrays with their extents (commas inside
        // brackets are not separators), up to the ';'
        let decl = decl.split(';').next().unwrap();
        let names = &decl[decl.find(' ').expect("a type and a name")..];
        let mut depth = 0;
        let mut start = 0;
        let mut parts = vec![];
        for (i, c) in names.char_indices() {
            match c {
                '[' | '(' => depth += 1,
                ']' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&names[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&names[start..]);
        for part in parts {
            let name = part.split('[').next().unwrap().trim();
            out.push_str(&format!("EMU_SHARED({name});\n"));
        }
    }
    out
}

/// The kernels of the tensor layer, each with a wrapper that unpacks
/// cuLaunchKernel's argument array by the kernel's own signature, and
/// whether it synchronises its block (calls `__syncthreads`, itself or
/// through a device function).
fn kernels(src: &str) -> String {
    // device functions that synchronise the block
    let mut syncing: Vec<&str> = vec![];
    for part in src.split("__device__ ").skip(1) {
        let name = name_before_paren(part);
        if body(part).0.contains("__syncthreads") {
            syncing.push(name);
        }
    }
    let mut wrappers = String::new();
    let mut table = String::new();
    let mut sizes = String::new();
    for part in src.split("extern \"C\" __global__ void ").skip(1) {
        let name = name_before_paren(part);
        let open = part.find('(').unwrap();
        let close = part.find(')').expect("end of parameters");
        let types: Vec<&str> = part[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.trim();
                let ident = p
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .expect("a parameter name");
                p[..=ident].trim()
            })
            .collect();
        let args: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("*({t} *)p[{i}]"))
            .collect();
        sizes.push_str(&format!(
            "static const unsigned char size_{name}[] = {{{}}};\n",
            types
                .iter()
                .map(|t| format!("sizeof({t})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let (b, _) = body(part);
        let syncs =
            b.contains("__syncthreads") || syncing.iter().any(|f| b.contains(&format!("{f}(")));
        wrappers.push_str(&format!(
            "static void call_{name}(void** p) {{ {name}({}); }}\n",
            args.join(", ")
        ));
        table.push_str(&format!(
            "    {{\"{name}\", call_{name}, {syncs}, {}, size_{name}}},\n",
            types.len()
        ));
    }
    assert!(
        table.contains("\"mse_value\", call_mse_value, true,"),
        "the block reduction was not recognised as synchronising"
    );
    format!(
        "{}\n{wrappers}\n{sizes}\nstatic const Kernel KERNELS[] = {{\n{table}}};\n",
        register_shared(src)
    )
}

/// Builds the fake libcuda / libcublas / libnvrtc into a directory of the
/// calling crate's test scratch space (`None` without a C++ compiler,
/// unless SOFO_REQUIRE_CXX is set).
pub fn build() -> Option<std::path::PathBuf> {
    // once per test process: tests running side by side share one build
    static BUILT: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_now).clone()
}

fn build_now() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fake_gpu_{}", env!("CARGO_PKG_NAME")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kernels.inc"),
        kernels(sofo_tensor::cuda::kernel_source()),
    )
    .unwrap();
    let src = dir.join("fakecuda.cpp");
    std::fs::write(&src, include_str!("fakecuda.cpp")).unwrap();
    let lib = dir.join("libfakecuda.so");
    compile(
        &["-std=c++20", "-O2", "-pthread", "-I", dir.to_str().unwrap()],
        &src,
        &lib,
        "the fake GPU",
    )?;
    for name in ["libcuda.so", "libcublas.so", "libnvrtc.so"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link).unwrap();
    }
    Some(dir)
}

/// Compiles the C++ file `src` into the shared library `lib` with the
/// system compiler (`$CXX`, else `c++`) and `flags`; `None` where there is
/// no compiler — unless SOFO_REQUIRE_CXX is set (CI), where that fails.
/// `what` names the library in messages.
pub fn compile(
    flags: &[&str],
    src: &std::path::Path,
    lib: &std::path::Path,
    what: &str,
) -> Option<()> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = match std::process::Command::new(&cxx)
        .args(flags)
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib)
        .arg(src)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var_os("SOFO_REQUIRE_CXX").is_none(),
                "no C++ compiler `{cxx}` ({e}) and SOFO_REQUIRE_CXX is set"
            );
            eprintln!("skipping {what}: no C++ compiler `{cxx}` ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "{what} does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// `LD_LIBRARY_PATH` with the fake GPU's directory first.
pub fn library_path(dir: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}
