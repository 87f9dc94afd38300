package io.github.iopbridge.fhirsandbox;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Meta;
import org.springframework.beans.factory.annotation.Qualifier;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The Spring context of the sandbox: HAPI's own JPA (R4), Batch2 and bulk-export configurations, plus
 * the few beans an application must supply (database, JPA, storage settings, the RESTful server).
 */
@Configuration
@Import({
  JpaR4Config.class,
  HapiJpaConfig.class,
  JpaBatch2Config.class,
  Batch2JobsConfig.class,
  ThreadPoolFactoryConfig.class,
  // The in-memory message broker Batch2 passes its work notifications through.
  SubscriptionChannelConfig.class
})
public class SandboxConfig {

  /** Results per page when a search names no _count, and the most a _count may ask for. */
  static final int DEFAULT_PAGE_SIZE = 20;

  static final int MAX_PAGE_SIZE = 1000;

  /**
   * How often Batch2 (the job engine behind $export) looks for work. HAPI's default is once a minute,
   * and a bulk export moves one gated step per pass (queued, ids, files, manifest): minutes for a tiny
   * export. Once a second makes a small export finish in seconds, as a client's poll loop expects.
   */
  static final long JOB_MAINTENANCE_MILLIS = 1000;

  @Bean
  public JpaStorageSettings storageSettings() {
    JpaStorageSettings settings = new JpaStorageSettings();
    // Incremental pulls must see what was written a moment ago: never answer a search from a cached
    // earlier result (HAPI's default reuses one for 60 s).
    settings.setReuseCachedSearchResultsForMillis(null);
    // Client-assigned ids of any form (a PUT of Patient/123 as well as Patient/abc), like an EHR
    // migration; the server's own ids are then UUIDs so the two can never collide.
    settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
    settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
    // Bulk export: finish a small job in seconds (run the next step as soon as the last one ends, not
    // at the next one-minute maintenance pass), and give each kick-off its own job.
    settings.setJobFastTrackingEnabled(true);
    settings.setEnableBulkExportJobReuse(false);
    // Test data can be cleared in bulk.
    settings.setAllowMultipleDelete(true);
    settings.setExpungeEnabled(true);
    settings.setDeleteExpungeEnabled(true);
    return settings;
  }

  /** Sets {@link #JOB_MAINTENANCE_MILLIS} before the maintenance service schedules itself. */
  @Bean
  public static BeanPostProcessor jobMaintenanceFrequency() {
    return new BeanPostProcessor() {
      @Override
      public Object postProcessBeforeInitialization(Object bean, String beanName) {
        if (bean instanceof JobMaintenanceServiceImpl maintenance) {
          maintenance.setScheduledJobFrequencyMillis(JOB_MAINTENANCE_MILLIS);
        }
        return bean;
      }
    };
  }

  @Bean
  public PartitionSettings partitionSettings() {
    return new PartitionSettings();
  }

  @Bean
  public SubscriptionSettings subscriptionSettings() {
    return new SubscriptionSettings();
  }

  @Bean
  public IBinaryStorageSvc binaryStorageSvc() {
    return new DatabaseBinaryContentStorageSvcImpl();
  }

  @Bean(destroyMethod = "close")
  public BasicDataSource dataSource() {
    BasicDataSource ds = new BasicDataSource();
    ds.setDriverClassName("org.h2.Driver");
    ds.setUrl(Settings.fromSystemProperties().jdbcUrl());
    ds.setUsername("sa");
    ds.setPassword("");
    ds.setMaxTotal(20);
    return ds;
  }

  @Bean
  public LocalContainerEntityManagerFactoryBean entityManagerFactory(
      ConfigurableListableBeanFactory beanFactory,
      FhirContext fhirContext,
      JpaStorageSettings storageSettings,
      DataSource dataSource) {
    LocalContainerEntityManagerFactoryBean emf =
        HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
    emf.setPersistenceUnitName("HAPI_PU");
    emf.setDataSource(dataSource);
    Properties jpa = new Properties();
    // HAPI reads the dialect from here and refuses to start without one of its own.
    jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
    // A fresh H2 database gets HAPI's schema from the entities; an existing one is brought up to date.
    jpa.put("hibernate.hbm2ddl.auto", "update");
    // No full-text index (Lucene or Elasticsearch): plain JPA search covers what EHRs offer.
    jpa.put("hibernate.search.enabled", "false");
    jpa.put("hibernate.jdbc.batch_size", "20");
    jpa.put("hibernate.show_sql", "false");
    emf.setJpaProperties(jpa);
    return emf;
  }

  @Bean
  @Primary
  public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
    return new JpaTransactionManager(entityManagerFactory);
  }

  /** The FHIR endpoint itself, mounted by {@link Main} on /fhir/*. */
  @Bean
  public RestfulServer restfulServer(
      @Qualifier("mySystemDaoR4") IFhirSystemDao<Bundle, Meta> systemDao,
      @Qualifier("mySystemProviderR4") JpaSystemProvider<Bundle, Meta> systemProvider,
      ResourceProviderFactory resourceProviders,
      DatabaseBackedPagingProvider pagingProvider,
      JpaStorageSettings storageSettings,
      ISearchParamRegistry searchParamRegistry,
      IValidationSupport validationSupport,
      BulkDataExportProvider bulkDataExportProvider) {
    RestfulServer server = new RestfulServer(systemDao.getContext());
    server.setServerName("iop-bridge FHIR sandbox (HAPI FHIR JPA)");
    server.registerProviders(resourceProviders.createProviders());
    // Transactions and batches (POST of a Bundle to the base), $meta and friends.
    server.registerProvider(systemProvider);
    // $export (system, Group, Patient), $export-poll-status.
    server.registerProvider(bulkDataExportProvider);
    server.setServerConformanceProvider(
        new JpaCapabilityStatementProvider(
            server, systemDao, storageSettings, searchParamRegistry, validationSupport));
    pagingProvider.setDefaultPageSize(DEFAULT_PAGE_SIZE);
    pagingProvider.setMaximumPageSize(MAX_PAGE_SIZE);
    server.setPagingProvider(pagingProvider);
    server.setDefaultResponseEncoding(EncodingEnum.JSON);
    // Absolute links (next, Location, bulk output) built from the address the client used.
    server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
    return server;
  }
}
