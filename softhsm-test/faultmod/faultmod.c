/*
 * faultmod: a PKCS#11 module that forwards every call to a real module and
 * makes the calls a test names fail, so that keyward's tests can show what
 * happens when a token breaks: a device error, a removed token, a locked PIN,
 * a missing mechanism, a lost session now and then. It also counts the calls
 * it forwards, so that a test can tell how often keyward logged in or opened
 * sessions. Built by softhsmtest.NewFaults; never shipped.
 *
 * KEYWARD_FAULT_REAL    path of the real module (libsofthsm2.so)
 * KEYWARD_FAULT_FILE    control file, read on every call; one rule a line
 *                       (lines that match no function, like "# note", are
 *                       ignored):
 *                         C_Sign 0x30        C_Sign returns CKR_DEVICE_ERROR
 *                         C_Sign 0x30 once   ...the first time only
 *                         C_Sign 0x30 1%     ...on 1 % of calls (0.5% etc.)
 *                         * 0xE0             every wrapped call returns it
 *                         seed 42            seeds the draws of the % rules
 *                       The first rule that fires wins and the real call is
 *                       skipped. When the file changes, "once" rules are
 *                       armed again and every % rule restarts its own
 *                       sequence of draws from the seed (default 1), so a
 *                       run of calls meets the same faults every time.
 * KEYWARD_FAULT_COUNTS  counter file, mapped shared so that it is current
 *                       for any reader: one record per wrapped function,
 *                       char name[32] then calls, injected, ok as uint64 in
 *                       host byte order (56 bytes). calls counts every call
 *                       that reached this module, injected those a rule
 *                       failed, ok those that returned CKR_OK. The counts
 *                       survive the module being unloaded and loaded again.
 */
#define CK_PTR *
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType(*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType(*name)
#ifndef NULL_PTR
#define NULL_PTR 0
#endif

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pkcs11.h"

#define MAX_RULES 64

/* CALLS lists every wrapped function: name, parameters, arguments. */
#define CALLS(X) \
	X(C_Initialize, (CK_VOID_PTR a), (a)) \
	X(C_Finalize, (CK_VOID_PTR a), (a)) \
	X(C_GetSlotList, (CK_BBOOL a, CK_SLOT_ID_PTR b, CK_ULONG_PTR c), (a, b, c)) \
	X(C_GetTokenInfo, (CK_SLOT_ID a, CK_TOKEN_INFO_PTR b), (a, b)) \
	X(C_OpenSession, (CK_SLOT_ID a, CK_FLAGS b, CK_VOID_PTR c, CK_NOTIFY d, CK_SESSION_HANDLE_PTR e), (a, b, c, d, e)) \
	X(C_CloseSession, (CK_SESSION_HANDLE a), (a)) \
	X(C_GetSessionInfo, (CK_SESSION_HANDLE a, CK_SESSION_INFO_PTR b), (a, b)) \
	X(C_Login, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d), (a, b, c, d)) \
	X(C_Logout, (CK_SESSION_HANDLE a), (a)) \
	X(C_GetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d), (a, b, c, d)) \
	X(C_FindObjectsInit, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c), (a, b, c)) \
	X(C_FindObjects, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE_PTR b, CK_ULONG c, CK_ULONG_PTR d), (a, b, c, d)) \
	X(C_FindObjectsFinal, (CK_SESSION_HANDLE a), (a)) \
	X(C_DestroyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b)) \
	X(C_GenerateKey, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e), (a, b, c, d, e)) \
	X(C_GenerateKeyPair, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_ATTRIBUTE_PTR e, CK_ULONG f, CK_OBJECT_HANDLE_PTR g, CK_OBJECT_HANDLE_PTR h), (a, b, c, d, e, f, g, h)) \
	X(C_EncryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c)) \
	X(C_Encrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e)) \
	X(C_DecryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c)) \
	X(C_Decrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e)) \
	X(C_SignInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c)) \
	X(C_Sign, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e)) \
	X(C_GenerateRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))

#define INDEX(name, params, args) I_##name,
enum { CALLS(INDEX) NCALLS };

#define NAME(name, params, args) #name,
static const char *names[NCALLS] = {CALLS(NAME)};

struct count {
	char name[32];
	uint64_t calls, injected, ok;
};

static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST list;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char seen[4096];          /* the control file as last read */
static int fired[MAX_RULES];     /* which "once" rules fired since it changed */
static uint64_t draw[MAX_RULES]; /* each % rule's generator state */
static struct count local[NCALLS];
static struct count *counts = local; /* the mapped counter file, if any */

/* splitmix64: a small, well-mixed generator; each % rule has its own. */
static uint64_t next(uint64_t *s) {
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* reset arms the rules again after the control file changed. */
static void reset(const char *buf) {
	uint64_t seed = 1;
	const char *p = strstr(buf, "seed ");
	int i;

	if (p != NULL && (p == buf || p[-1] == '\n'))
		seed = strtoull(p + 5, NULL, 0);
	memset(fired, 0, sizeof fired);
	for (i = 0; i < MAX_RULES; i++)
		draw[i] = seed * 0x2545F4914F6CDD1DULL + (uint64_t)i;
}

static CK_RV fault(const char *fn) {
	const char *path = getenv("KEYWARD_FAULT_FILE");
	char buf[4096];
	FILE *f;
	size_t n;
	CK_RV rv = CKR_OK;
	char *save = NULL, *line;
	int i = 0;

	if (path == NULL || (f = fopen(path, "r")) == NULL)
		return CKR_OK;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;

	pthread_mutex_lock(&mu);
	if (strcmp(buf, seen) != 0) {
		memcpy(seen, buf, n + 1);
		reset(buf);
	}
	for (line = strtok_r(buf, "\n", &save); line != NULL && i < MAX_RULES; line = strtok_r(NULL, "\n", &save), i++) {
		char name[64], mode[16] = "";
		unsigned long code;
		if (sscanf(line, "%63s %lx %15s", name, &code, mode) < 2)
			continue;
		if (strcmp(name, fn) != 0 && strcmp(name, "*") != 0)
			continue;
		if (strcmp(mode, "once") == 0) {
			if (fired[i])
				continue;
			fired[i] = 1;
		} else if (mode[0] != 0 && mode[strlen(mode) - 1] == '%') {
			double p = strtod(mode, NULL) / 100;
			if ((double)(next(&draw[i]) >> 11) / 9007199254740992.0 >= p)
				continue;
		}
		rv = code;
		break;
	}
	pthread_mutex_unlock(&mu);
	return rv;
}

/* mapcounts puts the counters in the file KEYWARD_FAULT_COUNTS names. */
static void mapcounts(void) {
	const char *path = getenv("KEYWARD_FAULT_COUNTS");
	size_t size = sizeof(struct count) * NCALLS;
	void *m;
	int fd, i;

	if (path == NULL || (fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0)
		return;
	if (lseek(fd, 0, SEEK_END) < (off_t)size && ftruncate(fd, size) != 0) {
		close(fd);
		return;
	}
	m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED)
		return;
	counts = m;
	for (i = 0; i < NCALLS; i++)
		strncpy(counts[i].name, names[i], sizeof counts[i].name - 1);
}

#define WRAP(name, params, args)                                               \
	static CK_RV w_##name params {                                         \
		struct count *cnt_ = &counts[I_##name];                        \
		CK_RV rv = fault(#name);                                       \
		__atomic_fetch_add(&cnt_->calls, 1, __ATOMIC_RELAXED);            \
		if (rv != CKR_OK) {                                            \
			__atomic_fetch_add(&cnt_->injected, 1, __ATOMIC_RELAXED); \
			return rv;                                             \
		}                                                              \
		rv = real->name args;                                          \
		if (rv == CKR_OK)                                              \
			__atomic_fetch_add(&cnt_->ok, 1, __ATOMIC_RELAXED);       \
		return rv;                                                     \
	}
CALLS(WRAP)

#define SET(name, params, args) list.name = w_##name;

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
	if (out == NULL)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&mu);
	if (real == NULL) {
		const char *path = getenv("KEYWARD_FAULT_REAL");
		void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
		CK_C_GetFunctionList get = lib ? (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList") : NULL;
		if (get == NULL || get(&real) != CKR_OK) {
			real = NULL;
			pthread_mutex_unlock(&mu);
			return CKR_GENERAL_ERROR;
		}
		mapcounts();
		list = *real;
		CALLS(SET)
	}
	pthread_mutex_unlock(&mu);
	*out = &list;
	return CKR_OK;
}
