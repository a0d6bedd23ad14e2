/*
 * faultmod: a PKCS#11 module that forwards every call to a real module and
 * makes the calls a test names fail, so that keyward's tests can show what
 * happens when a token breaks: a device error, a removed token, a locked PIN,
 * a missing mechanism. Built by softhsmtest.NewFaults; never shipped.
 *
 * KEYWARD_FAULT_REAL  path of the real module (libsofthsm2.so)
 * KEYWARD_FAULT_FILE  control file, read on every call; one rule a line:
 *                       C_Sign 0x30        C_Sign returns CKR_DEVICE_ERROR
 *                       C_Sign 0x30 once   ...the first time only
 *                       * 0xE0             every wrapped call returns it
 *                     A rule fires before the real call, which is then skipped.
 * KEYWARD_FAULT_LOG   if set, a file to which every wrapped call appends its
 *                     name and a newline, faulted or not: how a test counts
 *                     C_Login attempts in another process.
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
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pkcs11.h"

#define MAX_RULES 64

static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST list;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char seen[4096];       /* the control file as last read */
static int fired[MAX_RULES];  /* which "once" rules fired since it changed */

static CK_RV fault(const char *fn) {
	const char *path = getenv("KEYWARD_FAULT_FILE");
	const char *logpath = getenv("KEYWARD_FAULT_LOG");
	char buf[4096];
	FILE *f;
	size_t n;
	CK_RV rv = CKR_OK;
	char *save = NULL, *line;
	int i = 0;

	if (logpath != NULL && *logpath != 0) {
		pthread_mutex_lock(&mu);
		if ((f = fopen(logpath, "a")) != NULL) {
			fprintf(f, "%s\n", fn);
			fclose(f);
		}
		pthread_mutex_unlock(&mu);
	}
	if (path == NULL || (f = fopen(path, "r")) == NULL)
		return CKR_OK;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;

	pthread_mutex_lock(&mu);
	if (strcmp(buf, seen) != 0) {
		memcpy(seen, buf, n + 1);
		memset(fired, 0, sizeof fired);
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
		}
		rv = code;
		break;
	}
	pthread_mutex_unlock(&mu);
	return rv;
}

#define WRAP(name, params, args)                \
	static CK_RV w_##name params {          \
		CK_RV rv = fault(#name);        \
		if (rv != CKR_OK)               \
			return rv;              \
		return real->name args;         \
	}

WRAP(C_GetSlotList, (CK_BBOOL a, CK_SLOT_ID_PTR b, CK_ULONG_PTR c), (a, b, c))
WRAP(C_GetTokenInfo, (CK_SLOT_ID a, CK_TOKEN_INFO_PTR b), (a, b))
WRAP(C_OpenSession, (CK_SLOT_ID a, CK_FLAGS b, CK_VOID_PTR c, CK_NOTIFY d, CK_SESSION_HANDLE_PTR e), (a, b, c, d, e))
WRAP(C_GetSessionInfo, (CK_SESSION_HANDLE a, CK_SESSION_INFO_PTR b), (a, b))
WRAP(C_Login, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d), (a, b, c, d))
WRAP(C_GetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d), (a, b, c, d))
WRAP(C_FindObjectsInit, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c), (a, b, c))
WRAP(C_GenerateKey, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e), (a, b, c, d, e))
WRAP(C_GenerateKeyPair, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_ATTRIBUTE_PTR e, CK_ULONG f, CK_OBJECT_HANDLE_PTR g, CK_OBJECT_HANDLE_PTR h), (a, b, c, d, e, f, g, h))
WRAP(C_EncryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
WRAP(C_Encrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
WRAP(C_DecryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
WRAP(C_Decrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
WRAP(C_SignInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
WRAP(C_Sign, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e), (a, b, c, d, e))
WRAP(C_GenerateRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))

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
		list = *real;
		list.C_GetSlotList = w_C_GetSlotList;
		list.C_GetTokenInfo = w_C_GetTokenInfo;
		list.C_OpenSession = w_C_OpenSession;
		list.C_GetSessionInfo = w_C_GetSessionInfo;
		list.C_Login = w_C_Login;
		list.C_GetAttributeValue = w_C_GetAttributeValue;
		list.C_FindObjectsInit = w_C_FindObjectsInit;
		list.C_GenerateKey = w_C_GenerateKey;
		list.C_GenerateKeyPair = w_C_GenerateKeyPair;
		list.C_EncryptInit = w_C_EncryptInit;
		list.C_Encrypt = w_C_Encrypt;
		list.C_DecryptInit = w_C_DecryptInit;
		list.C_Decrypt = w_C_Decrypt;
		list.C_SignInit = w_C_SignInit;
		list.C_Sign = w_C_Sign;
		list.C_GenerateRandom = w_C_GenerateRandom;
	}
	pthread_mutex_unlock(&mu);
	*out = &list;
	return CKR_OK;
}
