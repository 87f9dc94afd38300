package io.github.iopbridge.fhirsandbox;

import ca.uhn.fhir.rest.server.RestfulServer;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/** Starts the HAPI FHIR JPA server on http://127.0.0.1:{port}/fhir and runs until SIGTERM. */
public final class Main {

  private static final Logger LOG = LoggerFactory.getLogger(Main.class);

  private Main() {}

  public static void main(String[] args) throws Exception {
    long began = System.nanoTime();
    Settings settings = Settings.fromSystemProperties();
    AnnotationConfigApplicationContext context =
        new AnnotationConfigApplicationContext(SandboxConfig.class);
    RestfulServer fhir = context.getBean(RestfulServer.class);

    Server jetty = new Server();
    ServerConnector connector = new ServerConnector(jetty);
    connector.setHost("127.0.0.1");
    connector.setPort(settings.port());
    jetty.addConnector(connector);
    ServletContextHandler handler = new ServletContextHandler();
    handler.setContextPath("/");
    ServletHolder holder = new ServletHolder("fhir", fhir);
    // Initialise HAPI's servlet (providers, capability statement) now, not on the first request.
    holder.setInitOrder(1);
    handler.addServlet(holder, "/fhir/*");
    jetty.setHandler(handler);
    jetty.setStopAtShutdown(false);

    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  LOG.info("stopping");
                  try {
                    jetty.stop();
                  } catch (Exception e) {
                    LOG.warn("jetty did not stop cleanly", e);
                  }
                  context.close();
                  LOG.info("stopped");
                },
                "sandbox-shutdown"));

    jetty.start();
    long millis = (System.nanoTime() - began) / 1_000_000;
    LOG.info(
        "ready at http://127.0.0.1:{}/fhir in {} ms (data in {})",
        connector.getLocalPort(),
        millis,
        settings.dataDir());
    jetty.join();
  }
}
