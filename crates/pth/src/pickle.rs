//! A pickle parser that builds an inert value tree and never executes anything.
//!
//! Python's unpickler calls whatever callables a pickle names; that is what makes `torch.load`
//! of an untrusted file dangerous. This one only records: a `GLOBAL` becomes a
//! [`Node::Global`] (after the caller's allow-list has accepted its name), a `REDUCE` or
//! `NEWOBJ` becomes a [`Node::Object`] holding the callable and its arguments, `BUILD` stores
//! the state on it, and persistent ids (torch's storages) become [`Node::PersId`]. The caller
//! interprets the tree.
//!
//! Containers live in an arena and the stack and memo hold indices into it, so an object that
//! is memoised and later filled (`EMPTY_DICT`, `BINPUT`, `SETITEMS`) is the same object
//! wherever it is referenced. Every length the pickle declares is checked against the bytes
//! that remain before anything is allocated, and the arena, stack and mark depth are bounded
//! by the pickle's own length, so a hostile pickle costs at most memory proportional to its
//! size and time linear in it.

/// A value on the stack: a scalar, or a container in the arena.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// An integer that does not (kept as its little-endian two's-complement bytes).
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A node of the arena.
    Ref(usize),
}

/// A container or a recorded call.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A module-level name (`torch._utils`, `_rebuild_tensor_v2`).
    Global { module: String, name: String },
    /// `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), never called: with
    /// the state BUILD gave it and the items SETITEMS/APPENDS added to it (an OrderedDict
    /// is `OrderedDict()` filled by SETITEMS).
    Object {
        callable: Value,
        args: Value,
        state: Option<Value>,
        items: Vec<(Value, Value)>,
        appended: Vec<Value>,
    },
    /// A persistent id (torch: `('storage', type, key, location, numel)`).
    PersId(Value),
}

/// The parsed pickle: its arena and its root value.
#[derive(Debug, Clone)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Value,
}

impl Pickle {
    /// The node a value refers to, if it is a reference.
    pub fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(*i),
            _ => None,
        }
    }
}

/// Why a pickle did not parse: the offset and what was wrong, or the global refused.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseError {
    /// Malformed or truncated at this byte offset.
    At(usize, String),
    /// The allow-list refused `module.name`.
    Disallowed(String),
}

/// Most nested MARKs a pickle may open (the deepest checkpoints nest a few dozen).
pub const MAX_MARKS: usize = 4096;

/// Parses one pickle from the start of `data`; returns it and the number of bytes it used.
/// `allowed(module, name)` decides each global.
pub fn parse(
    data: &[u8],
    allowed: &dyn Fn(&str, &str) -> bool,
) -> Result<(Pickle, usize), ParseError> {
    let mut p = Parser {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        nodes: Vec::new(),
        allowed,
    };
    let root = p.run()?;
    Ok((
        Pickle {
            nodes: p.nodes,
            root,
        },
        p.pos,
    ))
}

struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
    nodes: Vec<Node>,
    allowed: &'a dyn Fn(&str, &str) -> bool,
}

impl Parser<'_> {
    fn err<T>(&self, what: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError::At(self.pos, what.into()))
    }

    /// The next `n` bytes, checked against what remains before anything is allocated.
    fn take(&mut self, n: usize) -> Result<&[u8], ParseError> {
        if n > self.data.len() - self.pos {
            return self.err(format!(
                "needs {n} bytes but {} remain",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64, ParseError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    /// A length field of `n` bytes, as a usize that fits in what remains.
    fn len(&mut self, n: usize) -> Result<usize, ParseError> {
        let v = self.uint(n)?;
        let remaining = (self.data.len() - self.pos) as u64;
        if v > remaining {
            return self.err(format!("declares {v} bytes but {remaining} remain"));
        }
        Ok(v as usize)
    }

    fn line(&mut self) -> Result<String, ParseError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("a text argument has no end of line");
        };
        let s = String::from_utf8(rest[..end].to_vec());
        self.pos += end + 1;
        s.or_else(|_| self.err("a text argument is not UTF-8"))
    }

    fn text(&mut self, n: usize) -> Result<String, ParseError> {
        let b = self.take(n)?.to_vec();
        String::from_utf8(b).or_else(|_| self.err("a string is not UTF-8"))
    }

    fn push_node(&mut self, n: Node) -> Value {
        self.nodes.push(n);
        Value::Ref(self.nodes.len() - 1)
    }

    fn pop(&mut self) -> Result<Value, ParseError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("pops past a MARK");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("pops an empty stack"),
        }
    }

    /// The values above the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, ParseError> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK to pop to");
        };
        Ok(self.stack.split_off(m))
    }

    fn top_node(&mut self) -> Result<usize, ParseError> {
        match self.stack.last() {
            Some(Value::Ref(i)) => Ok(*i),
            _ => self.err("expects a container on the stack"),
        }
    }

    fn global(&mut self, module: String, name: String) -> Result<Value, ParseError> {
        if !(self.allowed)(&module, &name) {
            return Err(ParseError::Disallowed(format!("{module}.{name}")));
        }
        Ok(self.push_node(Node::Global { module, name }))
    }

    fn memo_put(&mut self, idx: usize) -> Result<(), ParseError> {
        let Some(v) = self.stack.last().cloned() else {
            return self.err("memoises an empty stack");
        };
        // The memo is bounded by the pickle: an index beyond its length is malformed.
        if idx > self.data.len() {
            return self.err(format!("memo index {idx} is out of range"));
        }
        if self.memo.len() <= idx {
            self.memo.resize(idx + 1, None);
        }
        self.memo[idx] = Some(v);
        Ok(())
    }

    fn memo_get(&mut self, idx: usize) -> Result<(), ParseError> {
        match self.memo.get(idx).cloned().flatten() {
            Some(v) => {
                self.stack.push(v);
                Ok(())
            }
            None => self.err(format!("memo index {idx} was never set")),
        }
    }

    /// Adds key/value pairs to the dict or object at `target`.
    fn set_items(&mut self, target: usize, kv: Vec<Value>) -> Result<(), ParseError> {
        if kv.len() % 2 != 0 {
            return self.err("SETITEMS with an odd number of values");
        }
        let pairs = kv.chunks(2).map(|c| (c[0].clone(), c[1].clone()));
        match &mut self.nodes[target] {
            Node::Dict(items) | Node::Object { items, .. } => items.extend(pairs),
            _ => return self.err("SETITEM(S) on something that is not a dict"),
        }
        Ok(())
    }

    fn append(&mut self, target: usize, values: Vec<Value>) -> Result<(), ParseError> {
        match &mut self.nodes[target] {
            Node::List(items) => items.extend(values),
            Node::Object { appended, .. } => appended.extend(values),
            _ => return self.err("APPEND(S) on something that is not a list"),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, ParseError> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return self.err(format!("pickle protocol {proto} is unknown"));
                    }
                }
                // FRAME: an 8-byte length we only check.
                0x95 => {
                    self.len(8)?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return self.err("MARKs nested too deeply");
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.pop()?;
                    self.stack.push(v.clone());
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                b'K' => {
                    let v = self.uint(1)? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = self.uint(2)? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => match s.parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return self.err(format!("INT `{s}` is not a number")),
                        },
                    };
                    self.stack.push(v);
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.len(1)?
                    } else {
                        self.len(4)?
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.stack.push(long_value(bytes));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.len(1)?,
                        b'X' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let s = self.text(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        self.len(1)?
                    } else {
                        self.len(4)?
                    };
                    // Python 2 byte strings: latin-1 text as Python 3 reads them.
                    let s = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.stack.push(Value::Str(s));
                }
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => self.len(1)?,
                        b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b')' => {
                    let v = self.push_node(Node::Tuple(Vec::new()));
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::Tuple(items));
                    self.stack.push(v);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.push_node(Node::Tuple(items));
                    self.stack.push(v);
                }
                b']' => {
                    let v = self.push_node(Node::List(Vec::new()));
                    self.stack.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::List(items));
                    self.stack.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top_node()?;
                    self.append(t, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let t = self.top_node()?;
                    self.append(t, items)?;
                }
                b'}' => {
                    let v = self.push_node(Node::Dict(Vec::new()));
                    self.stack.push(v);
                }
                b'd' => {
                    let kv = self.pop_mark()?;
                    let v = self.push_node(Node::Dict(Vec::new()));
                    let Value::Ref(i) = v else { unreachable!() };
                    self.set_items(i, kv)?;
                    self.stack.push(v);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let t = self.top_node()?;
                    self.set_items(t, vec![key, value])?;
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    let t = self.top_node()?;
                    self.set_items(t, kv)?;
                }
                0x8f => {
                    let v = self.push_node(Node::Set(Vec::new()));
                    self.stack.push(v);
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let t = self.top_node()?;
                    match &mut self.nodes[t] {
                        Node::Set(s) => s.extend(items),
                        _ => return self.err("ADDITEMS on something that is not a set"),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::Set(items));
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.stack.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.err("STACK_GLOBAL needs two strings");
                    };
                    let v = self.global(module, name)?;
                    self.stack.push(v);
                }
                // REDUCE, NEWOBJ and NEWOBJ_EX (whose keyword arguments are dropped).
                b'R' | 0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?;
                    }
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.push_node(Node::Object {
                        callable,
                        args,
                        state: None,
                        items: Vec::new(),
                        appended: Vec::new(),
                    });
                    self.stack.push(v);
                }
                b'b' => {
                    let st = self.pop()?;
                    let t = self.top_node()?;
                    match &mut self.nodes[t] {
                        Node::Object { state, .. } => *state = Some(st),
                        _ => return self.err("BUILD on something that is not an object"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.push_node(Node::PersId(pid));
                    self.stack.push(v);
                }
                b'q' => {
                    let i = self.uint(1)? as usize;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.uint(4)? as usize;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len();
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.uint(1)? as usize;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.uint(4)? as usize;
                    self.memo_get(i)?;
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!(
                        "opcode 0x{other:02x} is not one a model checkpoint uses"
                    ));
                }
            }
        }
    }
}

/// A LONG1/LONG4 payload (little-endian two's complement) as an [`Value::Int`] when it fits.
fn long_value(mut bytes: Vec<u8>) -> Value {
    // Drop redundant sign bytes (a valid, if not minimal, encoding).
    while bytes.len() > 1 {
        let (last, prev) = (bytes[bytes.len() - 1], bytes[bytes.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            bytes.pop();
        } else {
            break;
        }
    }
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..bytes.len()].copy_from_slice(&bytes);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(_: &str, _: &str) -> bool {
        true
    }

    fn parse_all(data: &[u8]) -> Result<(Pickle, usize), ParseError> {
        parse(data, &all)
    }

    #[test]
    fn scalars_tuples_and_memo() {
        // PROTO 2, MARK, BININT1 7, SHORT_BINUNICODE "ab", NEWTRUE, TUPLE, BINPUT 0, BINGET 0,
        // TUPLE2, STOP.
        let data = b"\x80\x02(K\x07\x8c\x02ab\x88tq\x00h\x00\x86.";
        let (p, used) = parse_all(data).unwrap();
        assert_eq!(used, data.len());
        let Some(Node::Tuple(outer)) = p.node(&p.root) else {
            panic!("{:?}", p.root)
        };
        assert_eq!(outer.len(), 2);
        assert_eq!(outer[0], outer[1], "the memo returns the same node");
        let Some(Node::Tuple(inner)) = p.node(&outer[0]) else {
            panic!()
        };
        assert_eq!(
            inner,
            &vec![Value::Int(7), Value::Str("ab".into()), Value::Bool(true)]
        );
    }

    #[test]
    fn a_memoised_dict_filled_later_is_one_object() {
        // EMPTY_DICT, BINPUT 0, MARK, "k" BININT -2, SETITEMS, POP, BINGET 0, STOP.
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00kJ\xfe\xff\xff\xffu0h\x00.";
        let (p, _) = parse_all(data).unwrap();
        assert_eq!(
            p.node(&p.root),
            Some(&Node::Dict(vec![(Value::Str("k".into()), Value::Int(-2))]))
        );
    }

    #[test]
    fn globals_reduce_build_and_persistent_ids_are_recorded_not_run() {
        // GLOBAL collections OrderedDict, EMPTY_TUPLE, REDUCE, MARK "a" NONE SETITEMS,
        // BINPERSID of ("storage",), BUILD it as the state, STOP.
        let data =
            b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00aNu\x8c\x07storage\x85Qb.";
        let (p, _) = parse_all(data).unwrap();
        let Some(Node::Object {
            callable,
            items,
            state,
            ..
        }) = p.node(&p.root)
        else {
            panic!()
        };
        assert_eq!(
            p.node(callable),
            Some(&Node::Global {
                module: "collections".into(),
                name: "OrderedDict".into()
            })
        );
        assert_eq!(items, &vec![(Value::Str("a".into()), Value::None)]);
        assert!(matches!(
            p.node(state.as_ref().unwrap()),
            Some(Node::PersId(_))
        ));
    }

    #[test]
    fn long_integers_and_floats() {
        let data = b"\x80\x02\x8a\x02\x00\x80G?\xf8\x00\x00\x00\x00\x00\x00\x86.";
        let (p, _) = parse_all(data).unwrap();
        let Some(Node::Tuple(t)) = p.node(&p.root) else {
            panic!()
        };
        assert_eq!(t, &vec![Value::Int(-32768), Value::Float(1.5)]);
        assert_eq!(long_value(vec![0xff; 9]), Value::Int(-1));
        assert_eq!(
            long_value(vec![5, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Value::Int(5)
        );
        let big = vec![0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(long_value(big.clone()), Value::BigInt(big));
    }

    #[test]
    fn hostile_and_broken_pickles_are_errors() {
        let refuse = |m: &str, _: &str| m != "posix";
        let hostile = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        assert_eq!(
            parse(hostile, &refuse).unwrap_err(),
            ParseError::Disallowed("posix.system".into())
        );
        // A string that declares 2^40 bytes: refused before any allocation.
        let mut huge = b"\x80\x02\x8d".to_vec();
        huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
        huge.extend_from_slice(b"abc.");
        let ParseError::At(_, what) = parse_all(&huge).unwrap_err() else {
            panic!()
        };
        assert!(what.contains("declares 1099511627776 bytes"), "{what}");
        // Nested MARKs beyond the bound.
        let deep = vec![b'('; MAX_MARKS + 10];
        assert!(parse_all(&deep).is_err());
        // Each prefix of a valid pickle is an error, never a panic.
        let data = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00aNu.";
        for cut in 0..data.len() {
            assert!(parse_all(&data[..cut]).is_err(), "prefix of {cut} bytes");
        }
        for bad in [
            &b"\x80\x02s."[..],
            b"\x80\x02h\x05.",
            b"\x80\x02\xff",
            b"\x80\x02(.",
        ] {
            assert!(parse_all(bad).is_err(), "{bad:?}");
        }
    }
}
