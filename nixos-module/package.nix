# nix-cache-uploader built from this checkout, for the NixOS module (the
# project is not in nixpkgs).  Use it on its own with
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./nixos-module/package.nix { }'
#
# Besides the Python package and the `nix-cache-uploader` command, it installs
# the post-build hook as $out/libexec/nix-cache-uploader/post-build-hook: the
# module's hook wrapper execs it from there.
{ lib, python3Packages }:

let
  project = (lib.importTOML ../pyproject.toml).project;
in
python3Packages.buildPythonApplication {
  pname = "nix-cache-uploader";
  # The version lives in pyproject.toml only.
  inherit (project) version;
  pyproject = true;

  # Only what the build reads, so editing docs or tests does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../uploader
      ../hook
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    aiohttp
    boto3
    click
    prometheus-client
    pynacl
    watchdog
    zstandard
  ];

  postInstall = ''
    install -Dm755 hook/post-build-hook $out/libexec/nix-cache-uploader/post-build-hook
  '';

  # The test suite needs a running nix-daemon and SeaweedFS (scripts/test).
  # Python packages run their checks after installing, so this checks what
  # was installed: the package imports, the command starts, the hook parses.
  pythonImportsCheck = [
    "uploader"
    "uploader.cli"
  ];
  checkPhase = ''
    runHook preCheck
    $out/bin/nix-cache-uploader --version
    sh -n $out/libexec/nix-cache-uploader/post-build-hook
    runHook postCheck
  '';

  meta = {
    inherit (project) description;
    license = lib.licenses.mit;
    mainProgram = "nix-cache-uploader";
    platforms = lib.platforms.linux;
  };
}
