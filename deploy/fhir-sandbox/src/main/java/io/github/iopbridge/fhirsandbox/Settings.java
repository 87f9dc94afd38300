package io.github.iopbridge.fhirsandbox;

import java.nio.file.Path;

/**
 * What the launcher decides, read once from system properties (-Dsandbox.port, -Dsandbox.dataDir).
 *
 * @param port the TCP port on 127.0.0.1 (0: any free port)
 * @param dataDir where the H2 database files live
 */
record Settings(int port, Path dataDir) {

  static Settings fromSystemProperties() {
    int port = Integer.parseInt(System.getProperty("sandbox.port", "8080"));
    Path dataDir = Path.of(System.getProperty("sandbox.dataDir", "data")).toAbsolutePath();
    return new Settings(port, dataDir);
  }

  /** An H2 database in files under {@link #dataDir}, kept across restarts of the server. */
  String jdbcUrl() {
    return "jdbc:h2:file:" + dataDir.resolve("hapi") + ";DB_CLOSE_ON_EXIT=FALSE";
  }
}
