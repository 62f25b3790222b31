/* The one-pass header reader of `reader.py`, in C.
 *
 * Same walk, same DICOM JSON, element for element: `reader.read_header` calls `read` here and,
 * whenever this code meets anything it does not handle exactly like the Python reader (a character
 * set other than the default/latin-1/UTF-8, a structure the Python reader would decline, nesting
 * deeper than MAX_DEPTH), it raises `Unhandled` and the Python reader reads the file instead. The
 * equivalence is tested on every file of the shared data (tests/unit/extractor/test_fastreader.py).
 *
 * read(content: bytes, position: int, implicit: bool, max_value_bytes: int,
 *      resolve_vr: callable(tag, vr|None, pixel_rep) -> str,
 *      charset_kind: callable(raw bytes) -> int (0 latin-1, 1 UTF-8, -1 other))
 *   -> (json: dict, pixel_offset: int | None, private: dict[int, bytes])
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define UNDEFINED 0xFFFFFFFFu
#define ITEM 0xFFFEE000u
#define ITEM_DELIMITER 0xFFFEE00Du
#define SEQUENCE_DELIMITER 0xFFFEE0DDu
#define SPECIFIC_CHARACTER_SET 0x00080005u
#define PIXEL_REPRESENTATION 0x00280103u
#define MAX_DEPTH 48

static PyObject *Unhandled;
static PyObject *vr_cache[26][26];
static PyObject *s_vr, *s_Value, *s_InlineBinary, *s_SQ, *s_UN;
static PyObject *s_labels[3];

typedef struct {
    const unsigned char *buf;
    Py_ssize_t size;
    int implicit;
    Py_ssize_t max_value_bytes;
    PyObject *resolve_vr;
    PyObject *charset_kind;
    int charset; /* 0 latin-1, 1 UTF-8 */
    int pixel_rep;
    Py_ssize_t pixel_offset; /* -1: none */
    PyObject *private_;      /* dict */
} State;

static int unhandled(const char *why) {
    PyErr_SetString(Unhandled, why);
    return -1;
}

static inline uint16_t u16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t u64(const unsigned char *p) {
    return (uint64_t)u32(p) | ((uint64_t)u32(p + 4) << 32);
}

static int is_long_vr(const char *v) {
    static const char *vrs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"};
    for (size_t i = 0; i < sizeof(vrs) / sizeof(vrs[0]); i++)
        if (v[0] == vrs[i][0] && v[1] == vrs[i][1]) return 1;
    return 0;
}

static int is_short_vr(const char *v) {
    static const char *vrs[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO",
                                "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"};
    for (size_t i = 0; i < sizeof(vrs) / sizeof(vrs[0]); i++)
        if (v[0] == vrs[i][0] && v[1] == vrs[i][1]) return 1;
    return 0;
}

static PyObject *vr_string(const char *v) {
    if (v[0] < 'A' || v[0] > 'Z' || v[1] < 'A' || v[1] > 'Z') return NULL;
    PyObject **slot = &vr_cache[v[0] - 'A'][v[1] - 'A'];
    if (*slot == NULL) {
        *slot = PyUnicode_FromStringAndSize(v, 2);
        if (*slot == NULL) return NULL;
        PyUnicode_InternInPlace(slot);
    }
    return *slot; /* borrowed */
}

static int vr_is(PyObject *vr, const char *v) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(vr, &n);
    return s != NULL && n == (Py_ssize_t)strlen(v) && memcmp(s, v, n) == 0;
}

/* {"vr": vr} or {"vr": vr, key: value}; steals `value` */
static PyObject *attr(PyObject *vr, PyObject *key, PyObject *value) {
    PyObject *d = PyDict_New();
    if (d == NULL) {
        Py_XDECREF(value);
        return NULL;
    }
    if (PyDict_SetItem(d, s_vr, vr) < 0) goto fail;
    if (key != NULL && value != NULL) {
        if (PyDict_SetItem(d, key, value) < 0) goto fail;
        Py_DECREF(value);
    }
    return d;
fail:
    Py_XDECREF(value);
    Py_DECREF(d);
    return NULL;
}

static PyObject *decode(const unsigned char *p, Py_ssize_t n, int utf8) {
    if (utf8) return PyUnicode_DecodeUTF8((const char *)p, n, "replace");
    return PyUnicode_DecodeLatin1((const char *)p, n, NULL);
}

static inline int pad(unsigned char c) { return c == 0 || c == ' '; }

/* text VRs: one value (LT ST UT UR, right-stripped) or backslash-separated values */
static PyObject *text_values(const unsigned char *p, Py_ssize_t n, int utf8, int single) {
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    if (single) {
        Py_ssize_t e = n;
        while (e > 0 && pad(p[e - 1])) e--;
        if (e > 0) {
            PyObject *s = decode(p, e, utf8);
            if (s == NULL || PyList_Append(list, s) < 0) {
                Py_XDECREF(s);
                goto fail;
            }
            Py_DECREF(s);
        }
        return list;
    }
    int any = 0;
    Py_ssize_t start = 0;
    int several = memchr(p, '\\', n) != NULL;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '\\') continue;
        Py_ssize_t b = start, e = i;
        while (b < e && pad(p[b])) b++;
        while (e > b && pad(p[e - 1])) e--;
        PyObject *s;
        if (e > b) {
            s = decode(p + b, e - b, utf8);
            if (s == NULL) goto fail;
            any = 1;
        } else if (several) {
            s = Py_NewRef(Py_None);
        } else {
            s = NULL;
        }
        if (s != NULL) {
            if (PyList_Append(list, s) < 0) {
                Py_DECREF(s);
                goto fail;
            }
            Py_DECREF(s);
        }
        start = i + 1;
    }
    if (!any && PyList_SetSlice(list, 0, PyList_GET_SIZE(list), NULL) < 0) goto fail;
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* a DS/IS string as a JSON number; malformed text stays text; None when empty */
static PyObject *number(const unsigned char *p, Py_ssize_t n, int is_is) {
    Py_ssize_t b = 0, e = n;
    while (b < e && pad(p[b])) b++;
    while (e > b && pad(p[e - 1])) e--;
    if (e == b) return Py_NewRef(Py_None);
    PyObject *text = PyUnicode_DecodeLatin1((const char *)p + b, e - b, NULL);
    if (text == NULL) return NULL;
    PyObject *f = PyFloat_FromString(text);
    if (f == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
            Py_DECREF(text);
            return NULL;
        }
        PyErr_Clear();
        return text;
    }
    double d = PyFloat_AS_DOUBLE(f);
    if (isnan(d) || isinf(d)) {
        Py_DECREF(f);
        return text;
    }
    int integral = is_is;
    if (!integral && d == floor(d)) {
        integral = 1;
        for (Py_ssize_t i = b; i < e; i++)
            if (p[i] == '.' || p[i] == 'e' || p[i] == 'E') integral = 0;
    }
    Py_DECREF(text);
    if (integral) {
        PyObject *i = PyLong_FromDouble(d);
        Py_DECREF(f);
        return i;
    }
    return f;
}

static PyObject *person_name(const unsigned char *p, Py_ssize_t n, int utf8) {
    while (n > 0 && pad(p[n - 1])) n--;
    if (n == 0) return Py_NewRef(Py_None);
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    Py_ssize_t start = 0;
    int group = 0;
    for (Py_ssize_t i = 0; i <= n && group < 3; i++) {
        if (i < n && p[i] != '=') continue;
        if (i > start) {
            PyObject *s = decode(p + start, i - start, utf8);
            if (s == NULL || PyDict_SetItem(d, s_labels[group], s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(s);
        }
        group++;
        start = i + 1;
    }
    if (PyDict_GET_SIZE(d) == 0) {
        Py_DECREF(d);
        return Py_NewRef(Py_None);
    }
    return d;
}

static PyObject *base64(const unsigned char *p, Py_ssize_t n) {
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    Py_ssize_t out_n = 4 * ((n + 2) / 3);
    PyObject *s = PyUnicode_New(out_n, 127);
    if (s == NULL) return NULL;
    Py_UCS1 *o = PyUnicode_1BYTE_DATA(s);
    Py_ssize_t i = 0, j = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = ((uint32_t)p[i] << 16) | ((uint32_t)p[i + 1] << 8) | p[i + 2];
        o[j++] = tab[(v >> 18) & 63];
        o[j++] = tab[(v >> 12) & 63];
        o[j++] = tab[(v >> 6) & 63];
        o[j++] = tab[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n) v |= (uint32_t)p[i + 1] << 8;
        o[j++] = tab[(v >> 18) & 63];
        o[j++] = tab[(v >> 12) & 63];
        o[j++] = (i + 1 < n) ? tab[(v >> 6) & 63] : '=';
        o[j++] = '=';
    }
    return s;
}

static int any_not_none(PyObject *list) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++)
        if (PyList_GET_ITEM(list, i) != Py_None) return 1;
    return 0;
}

/* a backslash-separated value, each part through `part(p, n, arg)`: {"vr", "Value": [...]} or
 * {"vr"} when every part is None (DS/IS numbers, person names) */
static PyObject *split_values(const unsigned char *p, Py_ssize_t n, PyObject *vr,
                              PyObject *(*part)(const unsigned char *, Py_ssize_t, int), int arg) {
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '\\') continue;
        PyObject *x = part(p + start, i - start, arg);
        if (x == NULL || PyList_Append(list, x) < 0) {
            Py_XDECREF(x);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(x);
        start = i + 1;
    }
    if (!any_not_none(list)) {
        Py_DECREF(list);
        return attr(vr, NULL, NULL);
    }
    return attr(vr, s_Value, list);
}

/* one non-sequence value as a DICOM JSON attribute object (header_json.value_json) */
static PyObject *value_json(const unsigned char *p, Py_ssize_t n, PyObject *vr, State *st) {
    if (n == 0 || n > st->max_value_bytes) return attr(vr, NULL, NULL);
    Py_ssize_t vn;
    const char *v = PyUnicode_AsUTF8AndSize(vr, &vn);
    if (v == NULL) return NULL;
    if (vn != 2) return unhandled("unusual VR"), NULL;
    char a = v[0], b = v[1];
#define IS(x, y) (a == (x) && b == (y))
    int ascii = IS('A', 'E') || IS('A', 'S') || IS('C', 'S') || IS('D', 'A') || IS('D', 'T') ||
                IS('T', 'M') || IS('U', 'I');
    int text = ascii || IS('L', 'O') || IS('L', 'T') || IS('S', 'H') || IS('S', 'T') ||
               IS('U', 'C') || IS('U', 'R') || IS('U', 'T');
    if (text) {
        int single = IS('L', 'T') || IS('S', 'T') || IS('U', 'T') || IS('U', 'R');
        PyObject *values = text_values(p, n, ascii ? 0 : st->charset, single);
        if (values == NULL) return NULL;
        if (PyList_GET_SIZE(values) == 0) {
            Py_DECREF(values);
            return attr(vr, NULL, NULL);
        }
        return attr(vr, s_Value, values);
    }
    if (IS('D', 'S') || IS('I', 'S')) return split_values(p, n, vr, number, IS('I', 'S'));
    int size = 0;
    if (IS('U', 'S') || IS('S', 'S')) size = 2;
    else if (IS('U', 'L') || IS('S', 'L') || IS('F', 'L')) size = 4;
    else if (IS('F', 'D') || IS('U', 'V') || IS('S', 'V')) size = 8;
    if (size) {
        Py_ssize_t count = n / size;
        PyObject *list = PyList_New(count);
        if (list == NULL) return NULL;
        for (Py_ssize_t i = 0; i < count; i++) {
            const unsigned char *q = p + i * size;
            PyObject *x;
            if (IS('U', 'S')) x = PyLong_FromLong(u16(q));
            else if (IS('S', 'S')) x = PyLong_FromLong((int16_t)u16(q));
            else if (IS('U', 'L')) x = PyLong_FromUnsignedLong(u32(q));
            else if (IS('S', 'L')) x = PyLong_FromLong((int32_t)u32(q));
            else if (IS('U', 'V')) x = PyLong_FromUnsignedLongLong(u64(q));
            else if (IS('S', 'V')) x = PyLong_FromLongLong((int64_t)u64(q));
            else if (IS('F', 'L')) {
                uint32_t bits = u32(q);
                float f;
                memcpy(&f, &bits, 4);
                x = PyFloat_FromDouble((double)f);
            } else {
                uint64_t bits = u64(q);
                double d;
                memcpy(&d, &bits, 8);
                x = PyFloat_FromDouble(d);
            }
            if (x == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, x);
        }
        return attr(vr, s_Value, list);
    }
    if (IS('P', 'N')) return split_values(p, n, vr, person_name, st->charset);
    if (IS('A', 'T')) {
        Py_ssize_t count = n / 4;
        PyObject *list = PyList_New(count);
        if (list == NULL) return NULL;
        for (Py_ssize_t i = 0; i < count; i++) {
            char hex[9];
            snprintf(hex, sizeof hex, "%04X%04X", u16(p + 4 * i), u16(p + 4 * i + 2));
            PyObject *x = PyUnicode_FromStringAndSize(hex, 8);
            if (x == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, x);
        }
        return attr(vr, s_Value, list);
    }
#undef IS
    PyObject *b64 = base64(p, n);
    if (b64 == NULL) return NULL;
    return attr(vr, s_InlineBinary, b64);
}

static PyObject *tag_key(uint32_t tag) {
    char key[9];
    snprintf(key, sizeof key, "%08X", tag);
    return PyUnicode_FromStringAndSize(key, 8);
}

static PyObject *dataset(State *st, Py_ssize_t *position, Py_ssize_t end, int top, int depth);

static PyObject *sequence(State *st, Py_ssize_t *position, Py_ssize_t end, int implicit, int depth) {
    if (implicit != st->implicit) return unhandled("sequence in another VR mode"), NULL;
    if (depth > MAX_DEPTH) return unhandled("nesting too deep"), NULL;
    PyObject *items = PyList_New(0);
    if (items == NULL) return NULL;
    Py_ssize_t pos = *position;
    while (pos < end) {
        if (pos + 8 > st->size) goto cut;
        uint32_t tag = ((uint32_t)u16(st->buf + pos) << 16) | u16(st->buf + pos + 2);
        uint32_t length = u32(st->buf + pos + 4);
        pos += 8;
        if (tag == SEQUENCE_DELIMITER) break;
        if (tag != ITEM) goto cut;
        PyObject *item;
        if (length == UNDEFINED) {
            item = dataset(st, &pos, end, 0, depth + 1);
        } else {
            if (pos + (Py_ssize_t)length > end) goto cut;
            Py_ssize_t inner = pos;
            item = dataset(st, &inner, pos + length, 0, depth + 1);
            pos += length;
        }
        if (item == NULL || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(item);
    }
    *position = pos;
    return items;
cut:
    Py_DECREF(items);
    return unhandled("sequence structure"), NULL;
}

static int set_sequence(PyObject *out, uint32_t tag, PyObject *items) {
    PyObject *key = tag_key(tag);
    PyObject *value = attr(s_SQ, s_Value, items);
    int rc = (key == NULL || value == NULL) ? -1 : PyDict_SetItem(out, key, value);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc;
}

static PyObject *dataset(State *st, Py_ssize_t *position, Py_ssize_t end, int top, int depth) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    Py_ssize_t pos = *position;
    const unsigned char *buf = st->buf;
    while (pos < end) {
        if (pos + 8 > end) goto declined;
        uint16_t group = u16(buf + pos), element = u16(buf + pos + 2);
        uint32_t tag = ((uint32_t)group << 16) | element;
        if (tag == ITEM_DELIMITER) {
            pos += 8;
            break;
        }
        if (top && (tag == 0x7FE00010u || tag == 0x7FE00009u || tag == 0x7FE00008u)) {
            st->pixel_offset = pos;
            break;
        }
        if (group == 0xFFFE) goto declined;
        PyObject *vr = NULL; /* borrowed */
        char vrc[2] = {0, 0};
        uint32_t length;
        Py_ssize_t start;
        if (st->implicit) {
            length = u32(buf + pos + 4);
            start = pos + 8;
        } else {
            vrc[0] = (char)buf[pos + 4];
            vrc[1] = (char)buf[pos + 5];
            if (is_long_vr(vrc)) {
                if (pos + 12 > st->size) goto declined;
                length = u32(buf + pos + 8);
                start = pos + 12;
            } else if (is_short_vr(vrc)) {
                length = u16(buf + pos + 6);
                start = pos + 8;
            } else {
                goto declined;
            }
            vr = vr_string(vrc);
            if (vr == NULL) goto error;
        }
        int explicit_un = vr != NULL && vrc[0] == 'U' && vrc[1] == 'N';
        PyObject *resolved; /* new reference */
        if (vr == NULL || explicit_un) {
            resolved = PyObject_CallFunction(st->resolve_vr, "IOi", tag, vr ? vr : Py_None,
                                             st->pixel_rep);
            if (resolved == NULL) goto error;
            if (!PyUnicode_Check(resolved)) {
                Py_DECREF(resolved);
                goto declined;
            }
        } else {
            resolved = Py_NewRef(vr);
        }
        int is_sq = vr_is(resolved, "SQ"), is_un = vr_is(resolved, "UN");
        int skip = element == 0 || group == 0x0002 || tag > 0xFFFC0000u;
        if (length == UNDEFINED) {
            if (!(is_sq || is_un)) {
                Py_DECREF(resolved);
                goto declined;
            }
            Py_DECREF(resolved);
            Py_ssize_t inner = start;
            PyObject *items = sequence(st, &inner, st->size, explicit_un || st->implicit, depth);
            if (items == NULL) goto error;
            pos = inner;
            if (!skip) {
                if (set_sequence(out, tag, items) < 0) goto error;
            } else {
                Py_DECREF(items);
            }
            continue;
        }
        Py_ssize_t stop = start + (Py_ssize_t)length;
        if (stop > end) {
            Py_DECREF(resolved);
            goto declined;
        }
        if (is_sq) {
            Py_ssize_t inner = start;
            PyObject *items = sequence(st, &inner, stop, st->implicit || explicit_un, depth);
            if (items == NULL) {
                Py_DECREF(resolved);
                goto error;
            }
            if (!skip) {
                if (set_sequence(out, tag, items) < 0) {
                    Py_DECREF(resolved);
                    goto error;
                }
            } else {
                Py_DECREF(items);
            }
        } else if (!skip) {
            const unsigned char *raw = buf + start;
            if (top) {
                if (group & 1) {
                    PyObject *k = PyLong_FromUnsignedLong(tag);
                    PyObject *b = PyBytes_FromStringAndSize((const char *)raw, length);
                    int rc = (k && b) ? PyDict_SetItem(st->private_, k, b) : -1;
                    Py_XDECREF(k);
                    Py_XDECREF(b);
                    if (rc < 0) {
                        Py_DECREF(resolved);
                        goto error;
                    }
                } else if (tag == SPECIFIC_CHARACTER_SET) {
                    PyObject *b = PyBytes_FromStringAndSize((const char *)raw, length);
                    PyObject *kind = b ? PyObject_CallOneArg(st->charset_kind, b) : NULL;
                    Py_XDECREF(b);
                    if (kind == NULL) {
                        Py_DECREF(resolved);
                        goto error;
                    }
                    long k = PyLong_AsLong(kind);
                    Py_DECREF(kind);
                    if (k < 0) {
                        Py_DECREF(resolved);
                        if (!PyErr_Occurred()) unhandled("character set");
                        goto error;
                    }
                    st->charset = (int)k;
                } else if (tag == PIXEL_REPRESENTATION && length >= 2) {
                    st->pixel_rep = u16(raw);
                }
            }
            PyObject *key = tag_key(tag);
            PyObject *value = key ? value_json(raw, length, resolved, st) : NULL;
            int rc = value ? PyDict_SetItem(out, key, value) : -1;
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (rc < 0) {
                Py_DECREF(resolved);
                goto error;
            }
        }
        Py_DECREF(resolved);
        pos = stop;
    }
    *position = pos;
    return out;
declined:
    unhandled("structure the Python reader declines");
error:
    Py_DECREF(out);
    return NULL;
}

static PyObject *fast_read(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer content;
    Py_ssize_t position, max_value_bytes;
    int implicit;
    PyObject *resolve_vr, *charset_kind;
    if (!PyArg_ParseTuple(args, "y*npnOO", &content, &position, &implicit, &max_value_bytes,
                          &resolve_vr, &charset_kind))
        return NULL;
    State st = {content.buf, content.len, implicit, max_value_bytes, resolve_vr, charset_kind,
                0, 0, -1, PyDict_New()};
    PyObject *result = NULL;
    if (st.private_ != NULL) {
        Py_ssize_t pos = position;
        PyObject *json = dataset(&st, &pos, content.len, 1, 0);
        if (json != NULL) {
            PyObject *offset = st.pixel_offset >= 0 ? PyLong_FromSsize_t(st.pixel_offset)
                                                    : Py_NewRef(Py_None);
            if (offset != NULL) result = PyTuple_Pack(3, json, offset, st.private_);
            Py_XDECREF(offset);
            Py_DECREF(json);
        }
        Py_DECREF(st.private_);
    }
    PyBuffer_Release(&content);
    return result;
}

static PyMethodDef methods[] = {
    {"read", fast_read, METH_VARARGS, "Read a data set into DICOM JSON (see reader.py)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastreader", "The one-pass header reader in C.", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastreader(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Unhandled = PyErr_NewException("_fastreader.Unhandled", NULL, NULL);
    s_vr = PyUnicode_InternFromString("vr");
    s_Value = PyUnicode_InternFromString("Value");
    s_InlineBinary = PyUnicode_InternFromString("InlineBinary");
    s_SQ = PyUnicode_InternFromString("SQ");
    s_UN = PyUnicode_InternFromString("UN");
    s_labels[0] = PyUnicode_InternFromString("Alphabetic");
    s_labels[1] = PyUnicode_InternFromString("Ideographic");
    s_labels[2] = PyUnicode_InternFromString("Phonetic");
    if (Unhandled == NULL || PyModule_AddObjectRef(m, "Unhandled", Unhandled) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
