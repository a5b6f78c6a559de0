# d365sync: PGXS build.  make PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

EXTENSION = d365sync
EXTVERSION = 0.2

MODULE_big = d365sync
OBJS = d365sync.o src/http.o src/odata.o src/odata_batch.o src/odata_pages.o src/auth.o \
	src/jsonutil.o src/spi_util.o src/settings.o src/runs.o \
	src/contact_source.o src/metadata.o src/pipeline.o src/contacts_out.o \
	src/activities.o src/incoming.o src/whoami.o src/table_owner.o src/capture.o \
	src/worker.o src/worker_shmem.o src/progress.o

# The install script of the current version is built from the parts in
# sql/install/ (one per subsystem, in file-name order).  Released scripts and
# upgrade scripts are shipped as they are: a released script is never edited.
DATA_built = sql/$(EXTENSION)--$(EXTVERSION).sql
DATA = sql/$(EXTENSION)--0.1.sql sql/$(EXTENSION)--0.1--0.2.sql
INSTALL_PARTS = $(sort $(wildcard $(srcdir)/sql/install/*.sql))

REGRESS = settings whoami http_faults contacts contact_keys schedule activities incoming privileges security matching identity pool incoming_fit redteam operations cron
REGRESS_OPTS = --load-extension=plpgsql

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers
# Warnings are errors in development and CI builds only (D365_WERROR=1, or
# CI=true as CI services set it): a newer compiler's new warning must not
# break a user's build.  scripts/test.sh builds with D365_WERROR=1.
ifneq ($(filter 1 true yes,$(D365_WERROR) $(CI)),)
PG_CFLAGS += -Werror
endif
SHLIB_LINK = -lcurl -ljansson

EXTRA_CLEAN = results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object depends on every header (PGXS tracks no header dependencies)
$(OBJS): $(wildcard $(srcdir)/src/*.h)

sql/$(EXTENSION)--$(EXTVERSION).sql: $(INSTALL_PARTS)
	cat $^ > $@

# The regression suites talk to the bundled Dataverse simulator.  Without it
# say what to start instead of failing every suite.
installcheck: d365-require-simulator
.PHONY: d365-require-simulator
d365-require-simulator:
	@if [ -z "$$D365_SIM_URL" ] || [ -z "$$D365_SIMCTL" ]; then \
		echo "make installcheck needs the Dataverse simulator: run 'bash scripts/test.sh' (starts a cluster and the simulator), or start sim/dataverse_sim.py and export D365_SIM_URL, D365_SIM_HTTPS_URL, D365_SIM_CA and D365_SIMCTL as scripts/lib.sh does (d365_start_sim)."; \
		exit 1; \
	fi
