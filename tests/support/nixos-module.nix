# Evaluates nixos-module/module.nix with nixpkgs' lib but without NixOS or
# nixpkgs: stand-in modules declare the NixOS options the module sets, and a
# stand-in `pkgs` has the few functions it calls.  tests/support/nixos.py
# runs it with `nix-instantiate --eval`.
#
# The stand-ins are typed loosely (`anything`), except where NixOS's own type
# decides something a test looks at: nix.settings merges like NixOS's, so a
# second post-build-hook conflicts there as it does on a real machine.
#
# A new option of the module that sets another NixOS option (a timer, say)
# needs that option declared in `nixosOptions` below.
{
  # nixpkgs' lib (its `lib` directory, imported)
  lib,
  # The test's own modules: its services.nix-cache-uploader settings.
  modules,
}:

let
  inherit (lib) mkOption types;

  # What a derivation is to the module: a store path that interpolates.  The
  # attributes of each stand-in keep what the real one would build from, so
  # that tests can look at it (e.g. the text of a script).
  fakeDerivation =
    name: attrs:
    attrs
    // {
      type = "derivation";
      inherit name;
      outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
    };

  pkgs = {
    # Only ./package.nix is called this way: the package the module runs.
    callPackage = _fn: _args: fakeDerivation "nix-cache-uploader" { };
    # As nixpkgs' writeShellScript: the text after a bash shebang.
    writeShellScript =
      name: text:
      fakeDerivation name {
        text = "#!/bin/bash\n" + text;
      };
    runCommand = name: env: script: fakeDerivation name { inherit env script; };
    formats.toml = _: rec {
      # As nixpkgs' formats.toml: TOML values, nested.
      valueType =
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]
        )
        // {
          description = "TOML value";
        };
      type = types.attrsOf valueType;
      generate = name: value: fakeDerivation name { inherit value; };
    };
  };

  # nix.settings as NixOS types it (nixos/modules/config/nix.nix).
  nixConfAtom = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      types.package
    ]
  );

  anything = mkOption {
    type = types.anything;
    default = { };
  };
  listOfAnything = mkOption {
    type = types.listOf types.anything;
    default = [ ];
  };

  nixosOptions = {
    options = {
      assertions = listOfAnything;
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      meta = anything;
      environment.etc = anything;
      environment.systemPackages = listOfAnything;
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      nix.package = mkOption {
        type = types.package;
        default = fakeDerivation "nix" { };
      };
      nix.settings = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf (types.either nixConfAtom (types.listOf nixConfAtom));
        };
        default = { };
      };
      systemd.services = anything;
      systemd.timers = anything;
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      users.users = anything;
      users.groups = anything;
    };
    config._module.args = { inherit pkgs; };
  };

  inherit
    (lib.evalModules {
      # The lib given, also when it is not the one evalModules comes from.
      specialArgs = { inherit lib; };
      modules = [
        nixosOptions
        ../../nixos-module/module.nix
      ]
      ++ modules;
    })
    config
    ;
in
{
  inherit config;
  # What NixOS would refuse to build with, as its toplevel does.
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
}
