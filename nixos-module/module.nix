# services.nix-cache-uploader: upload every build of this machine's nix-daemon
# to a signed binary cache.
#
# The nix-daemon runs the post-build hook (as root, ~1 ms, no network, never
# fails) which drops one entry per build into the spool; the uploader daemon
# runs as its own unprivileged user, holds the signing key (via systemd
# credentials, never readable by build users) and uploads the entries'
# closures.  See nixos-module/README.md for a usage example.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.nix-cache-uploader;
  # A builder of a fleet (docs/fleet.md): its own key, never the cache key.
  attesting = cfg.attestKeyFile != null;
  format = pkgs.formats.toml { };

  # TOML has no null: unset settings are left out, so the program's own
  # default applies (e.g. compression: the URL's compression=, else zstd).
  # metrics is written as the string the program reads, also when given as
  # a port number.
  configFile = format.generate "nix-cache-uploader.toml" (
    lib.filterAttrs (_: value: value != null) (cfg.settings // { inherit metrics; })
  );

  # The settings checked when the system is built, as atticd does: an unknown
  # setting or a malformed store URL fails the build instead of the service.
  # check-config needs neither the network nor the key (which only exists
  # on the machine).
  checkedConfigFile = pkgs.runCommand "nix-cache-uploader-checked.toml" { inherit configFile; } ''
    ${cfg.package}/bin/nix-cache-uploader check-config --config "$configFile"
    cp "$configFile" $out
  '';

  # One fact in several places: the default spool is also in
  # hook/post-build-hook and uploader/spool.py (DEFAULT_SPOOL); change all
  # three together.  The default GC-root and state directories are also in
  # uploader/config.py.
  defaultSpool = "/var/spool/nix-cache-uploader";
  defaultStateDir = "/var/lib/nix-cache-uploader";
  defaultGcRootsDir = "/nix/var/nix/gcroots/nix-cache-uploader";

  inherit (cfg.settings) spool;
  stateDir = cfg.settings.state-dir;
  gcRootsDir = cfg.settings.gc-roots-dir;
  # The program's default drain-timeout (uploader/config.py) when unset.
  drainTimeout = if cfg.settings.drain-timeout == null then 60 else cfg.settings.drain-timeout;

  # The nix-daemon runs this after every build.  It only tells the hook where
  # the spool is.  Run, not exec'd: a failing post-build-hook stops the
  # nix-daemon's builds, and bash exits 126/127 when exec fails, so a hook
  # that is missing or cannot run (a custom `package` without it) must cost
  # the cache an entry, never the build.
  hook = "${cfg.package}/libexec/nix-cache-uploader/post-build-hook";
  postBuildHook = pkgs.writeShellScript "nix-cache-uploader-post-build-hook" ''
    export NIX_CACHE_UPLOADER_SPOOL=${lib.escapeShellArg spool}
    ${lib.escapeShellArg hook} && exit 0
    echo "nix-cache-uploader: hook "${lib.escapeShellArg hook}" is missing or failed; build not queued" >&2
    exit 0
  '';

  inStore = path: lib.hasPrefix builtins.storeDir (toString path);

  # gc's durations (uploader/cli/gc.py): a unit is required, except for 0.
  durationType = lib.types.strMatching "0|([0-9]+(\\.[0-9]+)?[smhdw])+";

  # Secrets are named by a string: a path value ends up in the store as soon
  # as something interpolates it (and in a flake, `./key` is in the store
  # already).  lib.types.externalPath refuses path values and store paths;
  # nixpkgs older than it get the same check here.
  secretPath =
    lib.types.externalPath or (
      lib.types.addCheck lib.types.str (path: lib.hasPrefix "/" path && !inStore path)
      // {
        description = "absolute path not in the Nix store";
      }
    );

  # systemd expands specifiers (%h, %d...) in paths, in unit files and in
  # tmpfiles.d alike: a literal % is written %%.
  escapeSpecifiers = lib.replaceStrings [ "%" ] [ "%%" ];
  # One word of ExecStart=: literal, as a shell word would be (systemd also
  # expands $VAR there).
  execWord =
    word:
    let
      escaped = lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] word;
    in
    if builtins.match "[^[:space:]\"'\\;]+" escaped != null then
      escaped
    else
      "\"" + lib.replaceStrings [ "\\" "\"" ] [ "\\\\" "\\\"" ] escaped + "\"";

  # What both services run with; every loosening says why.
  hardening = {
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    # Python, cffi (PyNaCl), ctypes (watchdog's inotify) and the nix
    # client need no writable+executable memory: checked with the
    # kernel's equivalent (prctl PR_SET_MDWE) on a full upload.  Should a
    # future dependency need it (a JIT, or libffi closures without static
    # trampolines), this is the line to turn off.
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    # A blocked call fails (and is logged) instead of killing the process
    # mid-upload.
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [
      # The nix-daemon socket: the uploader reads the store through it.
      "AF_UNIX"
      # The S3 endpoint and upstream caches.
      "AF_INET"
      "AF_INET6"
    ];
  };

  # The directories the service writes besides its state: systemd must
  # find each one when it sets up the namespace (ProtectSystem=strict), or
  # the unit fails before the program can say what is wrong.
  # A file:// cache: the directory of the URL, without its parameters.
  fileCacheDir =
    let
      to = cfg.settings.to;
      rest = lib.removePrefix "file://" to;
      path = builtins.head (lib.splitString "?" (lib.removePrefix "localhost" rest));
    in
    if to != null && lib.hasPrefix "file://" to then
      (if path == "/" then path else lib.removeSuffix "/" path)
    else
      null;
  # /tmp and /var/tmp are private and writable already (PrivateTmp=).
  tmpDir =
    if cfg.settings.tmp-dir == null || lib.elem cfg.settings.tmp-dir [ "/tmp" "/var/tmp" ] then
      null
    else
      cfg.settings.tmp-dir;
  # Created when missing, owned by the service; an existing directory keeps
  # its owner and mode (the ':' prefixes), since it may be shared.
  createdDirs = lib.filter (dir: dir != null) [
    fileCacheDir
    tmpDir
  ];

  # Where the services' messages on missing or refused S3 credentials send
  # the operator: the file given, or the option when there is none (the
  # program would otherwise name the file beside its config, in the store).
  credentialsHint = {
    NIX_CACHE_UPLOADER_ENVIRONMENT_FILE =
      if cfg.environmentFile == null then "" else escapeSpecifiers cfg.environmentFile;
  };

  # `metrics = "[HOST:]PORT"`; the host defaults to 127.0.0.1.
  metrics = if cfg.settings.metrics == null then null else toString cfg.settings.metrics;
  metricsPort = lib.toInt (lib.last (lib.splitString ":" metrics));
  metricsLoopback =
    !(lib.hasInfix ":" metrics)
    || lib.hasPrefix "127." metrics
    || lib.hasPrefix "localhost:" metrics
    || lib.hasPrefix "[::1]:" metrics;
in
{
  meta.maintainers = [ ];

  options.services.nix-cache-uploader = {
    enable = lib.mkEnableOption "nix-cache-uploader, which signs every build of this machine and uploads it to a binary cache";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = ''
        The nix-cache-uploader package.  It must provide
        `bin/nix-cache-uploader` and `libexec/nix-cache-uploader/post-build-hook`.
      '';
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        Configuration of `nix-cache-uploader run`, written to a TOML file and
        passed with `--config`; the same file is installed as
        /etc/nix-cache-uploader/config.toml, so `nix-cache-uploader status`,
        `wait` and `retry` find the same spool and state directory.  Every
        setting is listed in docs/configuration.md.  The file is checked
        with `nix-cache-uploader check-config` when the system is built, so
        an unknown name or a bad value fails the build, not the service.
        The signing key is not a setting here: use
        {option}`services.nix-cache-uploader.secretKeyFile`.
      '';
      example = lib.literalExpression ''
        {
          to = "s3://my-nix-cache?region=eu-west-1";
          compression = "zstd";
          jobs = 8;
          upstream-keys = [ "cache.nixos.org-1" ];
        }
      '';
      type = lib.types.submodule {
        freeformType = format.type;
        options = {
          to = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "s3://my-nix-cache?region=eu-west-1";
            description = ''
              The binary cache to upload to, in Nix's store URL syntax:
              `s3://BUCKET?region=R`, `s3://BUCKET?endpoint=http://HOST:PORT`
              for other S3-compatible servers (see docs/s3-providers.md), or
              `file:///DIR`.
            '';
          };

          compression = lib.mkOption {
            type = lib.types.nullOr (
              lib.types.enum [
                "zstd"
                "xz"
                "none"
              ]
            );
            default = null;
            description = ''
              NAR compression.  `null`: the store URL's `compression=`
              parameter, else zstd (readable by Nix >= 2.3.17).
            '';
          };

          jobs = lib.mkOption {
            type = lib.types.ints.between 1 64;
            default = 4;
            description = "Store paths processed at once.";
          };

          upstream = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
            example = [ "https://cache.nixos.org" ];
            description = ''
              Binary caches whose paths are not uploaded again: each path is
              looked up there (answers are remembered) before uploading.
            '';
          };

          upstream-keys = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            # Unlike the command's own default (none), so that a NixOS
            # machine does not copy the nixpkgs closure it substituted from
            # cache.nixos.org into its own cache.  Substituters of this cache
            # then need cache.nixos.org as well; set [ ] for a cache that is
            # closed under references on its own.
            default = [ "cache.nixos.org-1" ];
            description = ''
              Names of signing keys whose paths are not uploaded again: a
              path that carries a signature by one of them came from that
              cache.  The default skips what cache.nixos.org serves; set
              `[ ]` to make this cache self-contained.
            '';
          };

          spool = lib.mkOption {
            type = lib.types.str;
            default = defaultSpool;
            description = ''
              Spool directory: the post-build hook writes one entry per build
              here (created as `root:<group>` with mode 2770).
            '';
          };

          tmp-dir = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "/var/cache/nix-cache-uploader";
            description = ''
              Where compressed NARs larger than 8 MiB wait for their upload.
              `null`: the service's private /tmp.  Created, owned by the
              service's user, when it does not exist.
            '';
          };

          low-priority = lib.mkOption {
            type = lib.types.bool;
            default = true;
            description = ''
              Run behind builds and interactive users: nice 19, a low CPU
              weight and the idle IO class.  `false` gives the uploader the
              same share as everything else.
            '';
          };

          drain-timeout = lib.mkOption {
            type = lib.types.nullOr lib.types.number;
            default = null;
            description = ''
              Seconds that in-flight uploads may run on stop.  `null`: the
              program's default, 60.  The unit's `TimeoutStopSec` is this
              plus 30.
            '';
          };

          metrics = lib.mkOption {
            type = lib.types.nullOr (lib.types.either lib.types.str lib.types.port);
            default = null;
            example = "0.0.0.0:9100";
            description = ''
              Serve Prometheus metrics at `http://HOST:PORT/metrics`, given
              as `"[HOST:]PORT"`; the host defaults to 127.0.0.1.  See
              {option}`services.nix-cache-uploader.openFirewall`.
            '';
          };
        };
      };
    };

    secretKeyFile = lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/var/lib/secrets/nix-cache-uploader.key";
      description = ''
        The binary cache signing key, in Nix's format (as made by
        `nix-cache-uploader keygen` or `nix-store --generate-binary-cache-key`).
        A string with an absolute path outside the Nix store, which every
        user can read.  A path value (`./key`) is refused: it is copied into
        the store as soon as something interpolates it.  The file may stay readable by root
        only: systemd passes a copy to the service through `LoadCredential`.
      '';
    };

    attestKeyFile = lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/var/lib/secrets/builder.key";
      description = ''
        Instead of {option}`services.nix-cache-uploader.secretKeyFile`: this
        machine is a builder of a fleet that trusts no single builder
        (see docs/fleet.md).  It holds only its own builder key (made by
        `nix-cache-uploader keygen`), stages the NARs of what it built and
        writes signed attestations; a publisher elsewhere signs narinfos
        once enough builders agree.  Passed like the secret key, through
        `LoadCredential`; set exactly one of the two.
      '';
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/var/lib/secrets/nix-cache-uploader.env";
      description = ''
        Environment file with the S3 credentials, e.g. `AWS_ACCESS_KEY_ID=…`
        and `AWS_SECRET_ACCESS_KEY=…` (or `AWS_PROFILE` with
        `AWS_SHARED_CREDENTIALS_FILE`).  Leave it `null` when the machine
        has an instance role, or for `file://` caches.  Like
        {option}`services.nix-cache-uploader.secretKeyFile`, a string
        outside the Nix store.
      '';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "nix-cache-uploader";
      description = ''
        User the uploader runs as; created when left at the default.  It holds
        the signing key, so give it to nothing else.
      '';
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "nix-cache-uploader";
      description = ''
        Group of the uploader, which owns the spool; created when left at the
        default.  Its members can read what was built and requeue entries.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "-v" ];
      description = ''
        More arguments of `nix-cache-uploader run`, each one word, taken
        literally: `[ "-v" ]` logs each path, `[ "-vv" ]` debug detail,
        `[ "-q" ]` errors only.  Settings belong in
        {option}`services.nix-cache-uploader.settings`.
      '';
    };

    gc = {
      enable = lib.mkEnableOption ''
        a timer that runs `nix-cache-uploader gc --delete` on the cache: it
        deletes what no pin, kept root or young narinfo needs, safely beside
        running uploaders (docs/lifecycle.md).  Enable it on one machine per
        bucket; a second gc refuses while one runs
      '';
      schedule = lib.mkOption {
        type = lib.types.str;
        default = "daily";
        example = "Sun 03:00";
        description = "When it runs (systemd.time(7) OnCalendar syntax).";
      };
      keepDays = lib.mkOption {
        type = lib.types.nullOr lib.types.ints.unsigned;
        default = null;
        description = "Keep the roots younger than this many days [gc's default: 30].";
      };
      keepLast = lib.mkOption {
        type = lib.types.nullOr lib.types.ints.unsigned;
        default = null;
        description = "Keep the newest this many complete roots of each name [gc's default: 1].";
      };
      grace = lib.mkOption {
        type = lib.types.nullOr durationType;
        default = null;
        example = "12h";
        description = "Keep narinfos younger than this [gc's default: 1d].";
      };
      narDelay = lib.mkOption {
        type = lib.types.nullOr durationType;
        default = null;
        description = ''
          How long a NAR outlives the last narinfo naming it [gc's default:
          31d, beyond Nix clients' 30-day narinfo cache].
        '';
      };
      extraArgs = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "-v" ];
        description = "More arguments for `nix-cache-uploader gc`, taken literally.";
      };
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Open the TCP port of `settings.metrics` in the firewall, for a
        Prometheus server on another machine (give `metrics` a host that
        is not the loopback, e.g. `"0.0.0.0:9100"`).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings.to != null;
        message = ''
          services.nix-cache-uploader.settings.to is not set: give the binary
          cache to upload to, e.g. "s3://my-nix-cache?region=eu-west-1".
        '';
      }
      {
        assertion = cfg.secretKeyFile == null || cfg.attestKeyFile == null;
        message = ''
          services.nix-cache-uploader.secretKeyFile and attestKeyFile are both
          set.  A builder in attest mode must not hold the cache key: keep
          attestKeyFile on builders and the cache key on the publisher only.
        '';
      }
      {
        assertion = !(cfg.settings ? attest-key-file);
        message = ''
          services.nix-cache-uploader.settings.attest-key-file is set; use
          services.nix-cache-uploader.attestKeyFile (passed through LoadCredential).
        '';
      }
      {
        assertion = cfg.secretKeyFile != null || cfg.attestKeyFile != null;
        message = ''
          services.nix-cache-uploader.secretKeyFile is not set.  Create a key
          pair outside the Nix store, e.g.
            nix-cache-uploader keygen cache.example.org-1 /var/lib/secrets/nix-cache-uploader.key /var/lib/secrets/nix-cache-uploader.pub
          and set secretKeyFile to the secret key's absolute path, as a
          string: "/var/lib/secrets/nix-cache-uploader.key" (with sops-nix or
          agenix: config.sops.secrets.<name>.path / config.age.secrets.<name>.path).
        '';
      }
      {
        assertion = !(cfg.settings ? secret-key-file);
        message = ''
          services.nix-cache-uploader.settings.secret-key-file is set, but the
          service passes the key it gets from secretKeyFile (through
          LoadCredential), which would override it.  Set
          services.nix-cache-uploader.secretKeyFile instead.
        '';
      }
      {
        assertion = cfg.openFirewall -> metrics != null;
        message = ''
          services.nix-cache-uploader.openFirewall is set, but settings.metrics
          is not: there is no port to open.  Set e.g. settings.metrics = "0.0.0.0:9100".
        '';
      }
    ];

    warnings = lib.optional (cfg.openFirewall && metrics != null && metricsLoopback) ''
      services.nix-cache-uploader.openFirewall opens port ${toString metricsPort}, but
      settings.metrics (${metrics}) listens on the loopback only; give it a host
      such as "0.0.0.0:${toString metricsPort}" for other machines to reach it.
    '';

    services.nix-cache-uploader.settings = {
      state-dir = lib.mkDefault defaultStateDir;
      gc-roots-dir = lib.mkDefault defaultGcRootsDir;
    };

    # nix.conf has one post-build-hook: another module that sets one
    # conflicts with this one (see nixos-module/README.md).
    nix.settings = {
      post-build-hook = postBuildHook;
      # The uploader asks the nix-daemon about store paths.  A no-op while
      # allowed-users is the default "*"; needed when it is restricted.
      extra-allowed-users = [ cfg.user ];
    };

    networking.firewall.allowedTCPPorts = lib.mkIf (cfg.openFirewall && metrics != null) [
      metricsPort
    ];

    environment.etc."nix-cache-uploader/config.toml".source = checkedConfigFile;
    environment.systemPackages = [ cfg.package ];

    users.users = lib.mkIf (cfg.user == "nix-cache-uploader") {
      nix-cache-uploader = {
        isSystemUser = true;
        inherit (cfg) group;
        home = defaultStateDir;
        description = "nix-cache-uploader daemon";
      };
    };
    users.groups = lib.mkIf (cfg.group == "nix-cache-uploader") {
      nix-cache-uploader = { };
    };

    systemd.tmpfiles.rules =
      map escapeSpecifiers (
        [
          # setgid: the hook (root) creates entries that the uploader's group can
          # read; nobody else can see what was built.
          "d ${spool} 2770 root ${cfg.group} -"
          # Roots that keep queued outputs alive until they are uploaded.
          "d ${gcRootsDir} 0755 ${cfg.user} ${cfg.group} -"
        ]
        # StateDirectory= below only manages /var/lib/nix-cache-uploader.
        ++ lib.optional (stateDir != defaultStateDir) "d ${stateDir} 0755 ${cfg.user} ${cfg.group} -"
        # ':' applies mode and owner only when tmpfiles creates the directory.
        ++ map (dir: "d ${dir} :0755 :${cfg.user} :${cfg.group} -") createdDirs
      );

    systemd.services.nix-cache-uploader = {
      description = "Upload Nix builds to a signed binary cache";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      requires = [ "nix-daemon.socket" ];

      # The uploader queries the store with `nix` and `nix-store`.
      path = [ config.nix.package ];
      environment = {
        # Nix clients want a writable home for their cache directory.
        HOME = stateDir;
      } // credentialsHint;

      serviceConfig = {
        ExecStart = lib.concatStringsSep " " (
          [
            "${cfg.package}/bin/nix-cache-uploader run"
            "--config ${checkedConfigFile}"
            # %d is the service's credentials directory; the key arrives there
            # readable by the service user only, wherever the original lives.
            (if attesting then "--attest-key-file %d/attest-key" else "--secret-key-file %d/secret-key")
          ]
          ++ map execWord cfg.extraArgs
        );
        LoadCredential =
          if attesting then
            "attest-key:${escapeSpecifiers cfg.attestKeyFile}"
          else
            "secret-key:${escapeSpecifiers cfg.secretKeyFile}";
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) (escapeSpecifiers cfg.environmentFile);

        User = cfg.user;
        Group = cfg.group;
        # systemd makes the default state directory; tmpfiles another one.
        StateDirectory = lib.mkIf (stateDir == defaultStateDir) "nix-cache-uploader";

        Restart = "on-failure";
        RestartSec = 10;
        # SIGTERM to the main process only: it stops taking work and lets
        # in-flight uploads finish for up to drain-timeout seconds.  With the
        # default KillMode=control-group the `nix` store queries of the running
        # batch would be killed at once, failing the batch the drain is for.
        KillMode = "mixed";
        KillSignal = "SIGTERM";
        # Longer than the drain, so systemd does not SIGKILL a drain that is
        # within its time; unfinished entries stay queued either way.
        TimeoutStopSec = builtins.ceil drainTimeout + 30;

        # Background work: builds and interactive users come first.
        Nice = lib.mkIf cfg.settings.low-priority 19;
        CPUWeight = lib.mkIf cfg.settings.low-priority 20;
        IOSchedulingClass = lib.mkIf cfg.settings.low-priority "idle";

        # Hardening (shared with the gc service).  The service reads the
        # store, writes only the spool, its GC roots and its state, and talks
        # to the nix-daemon and to S3.
        ReadWritePaths = map escapeSpecifiers (
          [
            spool
            gcRootsDir
          ]
          ++ lib.optional (stateDir != defaultStateDir) stateDir
          # '-': a directory that is gone (removed since boot, or on a
          # mount that failed) must not stop systemd from starting the
          # program, which then says what is missing.
          ++ map (dir: "-${dir}") createdDirs
        );
      }
      // hardening;
    };

    systemd.services.nix-cache-uploader-gc = lib.mkIf cfg.gc.enable {
      description = "Delete what no root or pin of the binary cache keeps";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = credentialsHint;
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.concatStringsSep " " (
          [
            "${cfg.package}/bin/nix-cache-uploader gc --delete"
            "--to ${execWord (toString cfg.settings.to)}"
          ]
          ++ lib.optional (cfg.gc.keepDays != null) "--keep-days ${toString cfg.gc.keepDays}"
          ++ lib.optional (cfg.gc.keepLast != null) "--keep-last ${toString cfg.gc.keepLast}"
          ++ lib.optional (cfg.gc.grace != null) "--grace ${execWord cfg.gc.grace}"
          ++ lib.optional (cfg.gc.narDelay != null) "--nar-delay ${execWord cfg.gc.narDelay}"
          ++ map execWord cfg.gc.extraArgs
        );
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) (escapeSpecifiers cfg.environmentFile);
        User = cfg.user;
        Group = cfg.group;
        # It signs nothing: no key.  It deletes from the cache, and writes
        # only a file:// cache's directory here.
        ReadWritePaths = map (dir: "-${escapeSpecifiers dir}") (lib.optional (fileCacheDir != null) fileCacheDir);
        Nice = 19;
        IOSchedulingClass = "idle";
      }
      // hardening;
    };

    systemd.timers.nix-cache-uploader-gc = lib.mkIf cfg.gc.enable {
      description = "Keep the binary cache small: nix-cache-uploader gc";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.schedule;
        # A run missed while the machine was off happens at the next boot;
        # machines of a fleet do not all start at the same minute.
        Persistent = true;
        RandomizedDelaySec = "1h";
      };
    };
  };
}
