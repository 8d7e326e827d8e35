# NixOS VM test of services.nix-cache-uploader, for machines with nixpkgs
# and KVM:
#
#   NIX_PATH=nixpkgs=channel:nixos-unstable nix-build nixos-module/test.nix
#
# (any nixpkgs from 24.05 on; or pass `-I nixpkgs=/path/to/nixpkgs`).  To poke
# at the machines: `nix-build nixos-module/test.nix -A driverInteractive &&
# ./result/bin/nixos-test-driver`.
#
# `builder` runs MinIO with a bucket and the module; an unprivileged user
# builds two derivations through the nix-daemon, the post-build hook queues
# them, `nix-cache-uploader wait` returns once they are uploaded, and `client`
# substitutes them over plain HTTP, trusting only the public key (and refuses
# them with any other key).
{
  pkgs ? import <nixpkgs> { },
}:

let
  inherit (pkgs) lib;

  s3User = "minio-test-user";
  s3Password = "minio-test-password";
  bucket = "cache";

  # Built in the VM by `alice`, offline: a dependency and a path that refers
  # to it, so the uploaded closure has two members.  builtins.storePath gives
  # the builder's path its context, so the sandbox makes busybox available.
  testBuild = pkgs.writeText "cache-test.nix" ''
    let
      system = "${pkgs.stdenv.hostPlatform.system}";
      busybox = "''${builtins.storePath "${pkgs.busybox}"}/bin/sh";
      dep = derivation {
        name = "cache-test-dep";
        inherit system;
        builder = busybox;
        args = [ "-c" "echo dependency > $out" ];
      };
    in
    derivation {
      name = "cache-test";
      inherit system;
      builder = busybox;
      args = [ "-c" "echo ''${dep} > $out" ];
    }
  '';

  nixosTest = pkgs.testers.nixosTest or pkgs.nixosTest;
in
nixosTest {
  name = "nix-cache-uploader";

  nodes = {
    builder = {
      imports = [ ./module.nix ];

      services.minio = {
        enable = true;
        rootCredentialsFile = pkgs.writeText "minio-credentials" ''
          MINIO_ROOT_USER=${s3User}
          MINIO_ROOT_PASSWORD=${s3Password}
        '';
      };
      networking.firewall.allowedTCPPorts = [ 9000 ];
      # MinIO wants 1 GiB of free disk and pre-allocates memory.
      virtualisation.diskSize = 4096;
      virtualisation.memorySize = 4096;

      services.nix-cache-uploader = {
        enable = true;
        # Written at run time by the test script: keys and credentials are
        # never in the store (the module refuses a key that is).
        secretKeyFile = "/run/secrets/cache-key";
        environmentFile = "/run/secrets/s3.env";
        settings = {
          to = "s3://${bucket}?endpoint=http://127.0.0.1:9000&region=us-east-1";
          # The cache must be complete on its own: the client has no other
          # substituter.
          upstream-keys = [ ];
          retry-max = 5;
        };
      };

      nix.settings.substituters = lib.mkForce [ ];
      users.users.alice.isNormalUser = true;
      environment.systemPackages = [ pkgs.minio-client ];
      system.extraDependencies = [
        pkgs.busybox
        testBuild
      ];
    };

    client = {
      nix.settings.substituters = lib.mkForce [ ];
      environment.systemPackages = [ pkgs.curl ];
    };
  };

  testScript = ''
    import json

    start_all()

    with subtest("an S3 bucket that anyone may read"):
        builder.wait_for_unit("minio.service")
        builder.wait_for_open_port(9000)
        builder.wait_until_succeeds(
            "mc alias set local http://127.0.0.1:9000 ${s3User} ${s3Password}"
        )
        builder.succeed(
            "mc mb local/${bucket}",
            "mc anonymous set download local/${bucket}",
        )

    with subtest("key and credentials outside the store; the service starts"):
        builder.succeed(
            "install -d -m 0700 /run/secrets",
            "nix-cache-uploader keygen test-cache-1 /run/secrets/cache-key /run/secrets/cache-key.pub",
            "printf 'AWS_ACCESS_KEY_ID=${s3User}\\nAWS_SECRET_ACCESS_KEY=${s3Password}\\n'"
            " > /run/secrets/s3.env",
            "chmod 0600 /run/secrets/s3.env",
            "systemctl restart nix-cache-uploader.service",
        )
        builder.wait_for_unit("nix-cache-uploader.service")
        public_key = builder.succeed("cat /run/secrets/cache-key.pub").strip()
        builder.succeed("systemctl show -p User --value nix-cache-uploader | grep -qx nix-cache-uploader")
        builder.succeed("stat -c '%a %U %G' /var/spool/nix-cache-uploader | grep -qx '2770 root nix-cache-uploader'")

    with subtest("build users can reach neither the key nor the spool"):
        builder.fail("su -l alice -c 'cat /run/secrets/cache-key'")
        builder.fail("su -l alice -c 'ls /var/spool/nix-cache-uploader'")

    with subtest("a build by an unprivileged user is uploaded"):
        out = builder.succeed("su -l alice -c 'nix-build --no-out-link ${testBuild}'").strip()
        builder.succeed("su -l alice -c 'nix-cache-uploader wait --timeout 120'")
        status = json.loads(builder.succeed("nix-cache-uploader status --json"))
        assert status["uploaded_paths"] >= 2, status
        assert not status["quarantined"], status
        builder.log(builder.succeed("systemd-analyze security nix-cache-uploader.service | tail -n 1"))

    with subtest("another machine substitutes it, trusting only the public key"):
        cache = "http://builder:9000/${bucket}"
        client.wait_for_unit("multi-user.target")
        client.succeed(f"curl -fsS {cache}/nix-cache-info | grep -q StoreDir")
        wrong_key = client.succeed(
            "nix-store --generate-binary-cache-key other-1 /tmp/other.sec /tmp/other.pub && cat /tmp/other.pub"
        ).strip()
        client.fail(
            f"nix-store --realise {out} --option substituters {cache}"
            f" --option trusted-public-keys '{wrong_key}'"
        )
        client.succeed(
            f"nix-store --realise {out} --option substituters {cache}"
            f" --option trusted-public-keys '{public_key}'"
        )
        client.succeed(f"grep -q cache-test-dep {out}")
        dep = client.succeed(f"cat {out}").strip()
        client.succeed(f"grep -qx dependency {dep}")
  '';
}
