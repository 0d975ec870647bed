//! SQL expressions, compiled once against a schema and evaluated a whole batch at a time with
//! Arrow kernels.
//!
//! Parsing is done by `sqlparser` (generic dialect). Compilation resolves columns, checks and
//! coerces types (integers widen to floats when mixed, string literals compared with timestamps
//! are parsed as timestamps, dictionary-encoded strings behave as strings) and rejects what is not
//! supported with a message that says what is. Evaluation never loops over rows except in the
//! few string functions Arrow has no kernel for.
//!
//! Supported: column references (`a`, or `left.a` for qualified columns), literals, `+ - * / %`,
//! comparisons, `AND OR NOT`, `||`, `IS [NOT] NULL`, `[NOT] IN (...)`, `BETWEEN`, `[I]LIKE`,
//! `CASE WHEN`, `CAST(x AS t)` and the functions `lower`, `upper`, `length`, `abs`, `coalesce`,
//! `concat`, `epoch_ms`.
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Datum, Int64Array, NullArray, Scalar, StringArray,
    UInt32Array,
};
use arrow::compute::kernels::{boolean, cmp, comparison, numeric};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use sqlparser::ast::{
    self as sql, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, SelectItem,
    UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;
use std::sync::Arc;

use freshet_engine::{EngineError, TIME_COLUMN};

/// An expression that failed to parse or type-check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    /// What is wrong, in words a user can act on.
    pub message: String,
}

fn err<T>(message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError {
        message: message.into(),
    })
}

/// The timestamp type used for event-time columns.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, None)
}

/// Parses one SQL expression, rejecting trailing input.
pub fn parse_expr(text: &str) -> Result<sql::Expr, ExprError> {
    let mut p = Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .map_err(|e| ExprError {
            message: format!("cannot parse '{text}': {e}"),
        })?;
    let e = p.parse_expr().map_err(|e| ExprError {
        message: format!("cannot parse '{text}': {e}"),
    })?;
    expect_end(&mut p, text)?;
    Ok(e)
}

fn expect_end(p: &mut Parser<'_>, text: &str) -> Result<(), ExprError> {
    let t = p.peek_token();
    if t.token != Token::EOF {
        return err(format!(
            "cannot parse '{text}': unexpected '{}' after the expression",
            t.token
        ));
    }
    Ok(())
}

/// Parses a select item: `expr`, `expr AS name`, or `*`. Returns `None` as the expression for `*`.
pub fn parse_select_item(text: &str) -> Result<(Option<sql::Expr>, Option<String>), ExprError> {
    let mut p = Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .map_err(|e| ExprError {
            message: format!("cannot parse '{text}': {e}"),
        })?;
    let item = p.parse_select_item().map_err(|e| ExprError {
        message: format!("cannot parse '{text}': {e}"),
    })?;
    expect_end(&mut p, text)?;
    match item {
        SelectItem::UnnamedExpr(e) => Ok((Some(e), None)),
        SelectItem::ExprWithAlias { expr, alias } => Ok((Some(expr), Some(alias.value))),
        SelectItem::Wildcard(_) => Ok((None, None)),
        _ => err(format!(
            "'{text}' is not supported here; write `expression [AS name]` or `*`"
        )),
    }
}

/// The name a select item gets without an alias: the column name for a column, else the text.
pub fn default_name(e: &sql::Expr) -> String {
    match e {
        sql::Expr::Identifier(i) => i.value.clone(),
        sql::Expr::CompoundIdentifier(parts) => {
            parts.last().map(|i| i.value.clone()).unwrap_or_default()
        }
        other => other.to_string(),
    }
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct Expr {
    node: Node,
    data_type: DataType,
}

#[derive(Debug, Clone)]
enum Node {
    Column(usize),
    Literal(ArrayRef),
    Arith(Arith, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    IsNull(Box<Expr>, bool),
    Cast(Box<Expr>),
    Case(Vec<(Expr, Expr)>, Option<Box<Expr>>),
    Like {
        expr: Box<Expr>,
        pattern: Box<Expr>,
        negated: bool,
        insensitive: bool,
    },
    Func(Func, Vec<Expr>),
}

#[derive(Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy)]
enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

#[derive(Debug, Clone, Copy)]
enum Func {
    Lower,
    Upper,
    Length,
    Abs,
    Coalesce,
    Concat,
    /// `a || b`: NULL if either side is NULL.
    ConcatOp,
}

/// The result of evaluating an expression: a column, or one value that stands for every row.
enum Value {
    Array(ArrayRef),
    Scalar(ArrayRef),
}

impl Value {
    fn datum(&self) -> Box<dyn Datum + '_> {
        match self {
            Value::Array(a) => Box::new(a.clone()),
            Value::Scalar(s) => Box::new(Scalar::new(s.clone())),
        }
    }

    fn into_array(self, rows: usize) -> Result<ArrayRef, EngineError> {
        match self {
            Value::Array(a) => Ok(a),
            Value::Scalar(s) => Ok(take(
                s.as_ref(),
                &UInt32Array::from(vec![0u32; rows]),
                None,
            )?),
        }
    }

    fn is_scalar(&self) -> bool {
        matches!(self, Value::Scalar(_))
    }

    fn wrap(&self, a: ArrayRef) -> Value {
        if self.is_scalar() {
            Value::Scalar(a)
        } else {
            Value::Array(a)
        }
    }
}

fn both(l: &Value, r: &Value, a: ArrayRef) -> Value {
    if l.is_scalar() && r.is_scalar() {
        Value::Scalar(a)
    } else {
        Value::Array(a)
    }
}

impl Expr {
    /// Compiles SQL text against `schema`.
    pub fn compile(text: &str, schema: &Schema) -> Result<Expr, ExprError> {
        compile(&parse_expr(text)?, schema)
    }

    /// The type of the result.
    pub fn data_type(&self) -> &DataType {
        &self.data_type
    }

    /// The input column this expression is, if it is just a column reference.
    pub fn as_column(&self) -> Option<usize> {
        match self.node {
            Node::Column(i) => Some(i),
            _ => None,
        }
    }

    /// Evaluates the expression over every row of `batch`.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<ArrayRef, EngineError> {
        self.eval(batch)?.into_array(batch.num_rows())
    }

    /// Evaluates a predicate; nulls count as false.
    pub fn evaluate_predicate(&self, batch: &RecordBatch) -> Result<BooleanArray, EngineError> {
        let a = self.evaluate(batch)?;
        let b = a.as_boolean_opt().ok_or_else(|| {
            EngineError::Operator(format!(
                "a condition must be boolean, not {}",
                type_name(a.data_type())
            ))
        })?;
        Ok(match b.nulls() {
            Some(nulls) if nulls.null_count() > 0 => {
                BooleanArray::new(b.values() & nulls.inner(), None)
            }
            _ => b.clone(),
        })
    }

    fn eval(&self, batch: &RecordBatch) -> Result<Value, EngineError> {
        Ok(match &self.node {
            Node::Column(i) => Value::Array(batch.column(*i).clone()),
            Node::Literal(a) => Value::Scalar(a.clone()),
            Node::Arith(op, l, r) => {
                let (lv, rv) = (l.eval(batch)?, r.eval(batch)?);
                let (ld, rd) = (lv.datum(), rv.datum());
                let a = match op {
                    Arith::Add => numeric::add(ld.as_ref(), rd.as_ref())?,
                    Arith::Sub => numeric::sub(ld.as_ref(), rd.as_ref())?,
                    Arith::Mul => numeric::mul(ld.as_ref(), rd.as_ref())?,
                    Arith::Div => numeric::div(ld.as_ref(), rd.as_ref())?,
                    Arith::Rem => numeric::rem(ld.as_ref(), rd.as_ref())?,
                };
                both(&lv, &rv, a)
            }
            Node::Cmp(op, l, r) => {
                let (lv, rv) = (l.eval(batch)?, r.eval(batch)?);
                let (ld, rd) = (lv.datum(), rv.datum());
                let b = match op {
                    CmpOp::Eq => cmp::eq(ld.as_ref(), rd.as_ref())?,
                    CmpOp::NotEq => cmp::neq(ld.as_ref(), rd.as_ref())?,
                    CmpOp::Lt => cmp::lt(ld.as_ref(), rd.as_ref())?,
                    CmpOp::LtEq => cmp::lt_eq(ld.as_ref(), rd.as_ref())?,
                    CmpOp::Gt => cmp::gt(ld.as_ref(), rd.as_ref())?,
                    CmpOp::GtEq => cmp::gt_eq(ld.as_ref(), rd.as_ref())?,
                };
                both(&lv, &rv, Arc::new(b))
            }
            Node::And(l, r) | Node::Or(l, r) => {
                let (lv, rv) = (l.eval(batch)?, r.eval(batch)?);
                let scalar = lv.is_scalar() && rv.is_scalar();
                let n = if scalar { 1 } else { batch.num_rows() };
                let la = if scalar {
                    lv.into_array(1)?
                } else {
                    lv.into_array(n)?
                };
                let ra = if scalar {
                    rv.into_array(1)?
                } else {
                    rv.into_array(n)?
                };
                let out = if matches!(self.node, Node::And(..)) {
                    boolean::and_kleene(la.as_boolean(), ra.as_boolean())?
                } else {
                    boolean::or_kleene(la.as_boolean(), ra.as_boolean())?
                };
                if scalar {
                    Value::Scalar(Arc::new(out))
                } else {
                    Value::Array(Arc::new(out))
                }
            }
            Node::Not(e) => {
                let v = e.eval(batch)?;
                let a = match &v {
                    Value::Array(a) | Value::Scalar(a) => {
                        Arc::new(boolean::not(a.as_boolean())?) as ArrayRef
                    }
                };
                v.wrap(a)
            }
            Node::Neg(e) => {
                let v = e.eval(batch)?;
                let a = match &v {
                    Value::Array(a) | Value::Scalar(a) => numeric::neg(a.as_ref())?,
                };
                v.wrap(a)
            }
            Node::IsNull(e, negated) => {
                let v = e.eval(batch)?;
                let a = match &v {
                    Value::Array(a) | Value::Scalar(a) => {
                        if *negated {
                            boolean::is_not_null(a.as_ref())?
                        } else {
                            boolean::is_null(a.as_ref())?
                        }
                    }
                };
                v.wrap(Arc::new(a))
            }
            Node::Cast(e) => {
                let v = e.eval(batch)?;
                let a = match &v {
                    Value::Array(a) | Value::Scalar(a) => cast(a.as_ref(), &self.data_type)?,
                };
                v.wrap(a)
            }
            Node::Case(whens, otherwise) => {
                let n = batch.num_rows();
                let mut result = match otherwise {
                    Some(e) => e.evaluate(batch)?,
                    None => arrow::array::new_null_array(&self.data_type, n),
                };
                // Apply from the last WHEN to the first so earlier branches win.
                for (cond, then) in whens.iter().rev() {
                    let mask = cond.evaluate_predicate(batch)?;
                    let t = then.eval(batch)?;
                    let td = t.datum();
                    result = arrow::compute::kernels::zip::zip(&mask, td.as_ref(), &result)?;
                }
                Value::Array(result)
            }
            Node::Like {
                expr,
                pattern,
                negated,
                insensitive,
            } => {
                let (lv, rv) = (expr.eval(batch)?, pattern.eval(batch)?);
                let (ld, rd) = (lv.datum(), rv.datum());
                let b = match (negated, insensitive) {
                    (false, false) => comparison::like(ld.as_ref(), rd.as_ref())?,
                    (true, false) => comparison::nlike(ld.as_ref(), rd.as_ref())?,
                    (false, true) => comparison::ilike(ld.as_ref(), rd.as_ref())?,
                    (true, true) => comparison::nilike(ld.as_ref(), rd.as_ref())?,
                };
                both(&lv, &rv, Arc::new(b))
            }
            Node::Func(f, args) => {
                let n = batch.num_rows();
                let vals: Vec<ArrayRef> = args
                    .iter()
                    .map(|a| a.evaluate(batch))
                    .collect::<Result<_, _>>()?;
                Value::Array(eval_func(*f, &vals, n, &self.data_type)?)
            }
        })
    }
}

fn eval_func(f: Func, args: &[ArrayRef], n: usize, ty: &DataType) -> Result<ArrayRef, EngineError> {
    Ok(match f {
        Func::Lower | Func::Upper => {
            let s = args[0].as_string::<i32>();
            let out: StringArray = s
                .iter()
                .map(|v| {
                    v.map(|v| {
                        if matches!(f, Func::Lower) {
                            v.to_lowercase()
                        } else {
                            v.to_uppercase()
                        }
                    })
                })
                .collect();
            Arc::new(out)
        }
        Func::Length => cast(
            &arrow::compute::kernels::length::length(args[0].as_ref())?,
            &DataType::Int64,
        )?,
        Func::Abs => {
            let zero: ArrayRef = cast(&Int64Array::from(vec![0]), ty)?;
            let neg = cmp::lt(&args[0], &Scalar::new(zero))?;
            let negated = numeric::neg(args[0].as_ref())?;
            arrow::compute::kernels::zip::zip(&neg, &negated, &args[0])?
        }
        Func::Coalesce => {
            let mut out = args[args.len() - 1].clone();
            for a in args.iter().rev().skip(1) {
                let present = boolean::is_not_null(a.as_ref())?;
                out = arrow::compute::kernels::zip::zip(&present, a, &out)?;
            }
            out
        }
        Func::ConcatOp => Arc::new(
            arrow::compute::kernels::concat_elements::concat_elements_utf8(
                args[0].as_string::<i32>(),
                args[1].as_string::<i32>(),
            )?,
        ),
        Func::Concat => {
            let mut out: ArrayRef = Arc::new(StringArray::from(vec![""; n]));
            for a in args {
                let s = cast(a.as_ref(), &DataType::Utf8)?;
                // concat() treats NULL as empty text, like PostgreSQL
                let empty: ArrayRef = Arc::new(StringArray::from(vec![""]));
                let present = boolean::is_not_null(s.as_ref())?;
                let s = arrow::compute::kernels::zip::zip(&present, &s, &Scalar::new(empty))?;
                out = Arc::new(
                    arrow::compute::kernels::concat_elements::concat_elements_utf8(
                        out.as_string::<i32>(),
                        s.as_string::<i32>(),
                    )?,
                );
            }
            out
        }
    })
}

fn column(schema: &Schema, name: &str) -> Result<Expr, ExprError> {
    let idx = schema.index_of(name).ok().or_else(|| {
        let lower = name.to_lowercase();
        let hits: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name().to_lowercase() == lower)
            .map(|(i, _)| i)
            .collect();
        if hits.len() == 1 {
            return Some(hits[0]);
        }
        // an unqualified name matches a qualified column (`amount` for `orders.amount`) if unique
        let suffix = format!(".{lower}");
        let hits: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name().to_lowercase().ends_with(&suffix))
            .map(|(i, _)| i)
            .collect();
        if hits.len() == 1 { Some(hits[0]) } else { None }
    });
    let Some(i) = idx else {
        let names: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| *n != TIME_COLUMN)
            .collect();
        return err(format!(
            "unknown column '{name}'; the input has: {}",
            names.join(", ")
        ));
    };
    let dt = schema.field(i).data_type().clone();
    let col = Expr {
        node: Node::Column(i),
        data_type: dt.clone(),
    };
    Ok(match dt {
        DataType::Dictionary(_, v) => Expr {
            node: Node::Cast(Box::new(col)),
            data_type: *v,
        },
        DataType::Int32
        | DataType::Int8
        | DataType::UInt8
        | DataType::Int16
        | DataType::UInt16
        | DataType::UInt32 => Expr {
            node: Node::Cast(Box::new(col)),
            data_type: DataType::Int64,
        },
        _ => col,
    })
}

fn literal(v: &sql::Value) -> Result<Expr, ExprError> {
    let (a, dt): (ArrayRef, DataType) = match v {
        sql::Value::Number(s, _) => match s.parse::<i64>() {
            Ok(i) => (Arc::new(Int64Array::from(vec![i])), DataType::Int64),
            Err(_) => match s.parse::<f64>() {
                Ok(f) => (
                    Arc::new(arrow::array::Float64Array::from(vec![f])),
                    DataType::Float64,
                ),
                Err(_) => return err(format!("'{s}' is not a number")),
            },
        },
        sql::Value::SingleQuotedString(s) | sql::Value::DoubleQuotedString(s) => (
            Arc::new(StringArray::from(vec![s.as_str()])),
            DataType::Utf8,
        ),
        sql::Value::Boolean(b) => (Arc::new(BooleanArray::from(vec![*b])), DataType::Boolean),
        sql::Value::Null => (Arc::new(NullArray::new(1)), DataType::Null),
        other => return err(format!("literal {other} is not supported")),
    };
    Ok(Expr {
        node: Node::Literal(a),
        data_type: dt,
    })
}

fn is_numeric(t: &DataType) -> bool {
    matches!(t, DataType::Int64 | DataType::Float64)
}

/// Casts `e` to `to`, folding literal casts at compile time.
fn coerce(e: Expr, to: &DataType) -> Result<Expr, ExprError> {
    if e.data_type == *to {
        return Ok(e);
    }
    if let Node::Literal(a) = &e.node {
        let c = cast(a.as_ref(), to).map_err(|x| ExprError {
            message: format!("cannot convert literal to {to}: {x}"),
        })?;
        if c.null_count() > a.null_count() {
            return err(format!("the literal cannot be read as {}", type_name(to)));
        }
        return Ok(Expr {
            node: Node::Literal(c),
            data_type: to.clone(),
        });
    }
    Ok(Expr {
        node: Node::Cast(Box::new(e)),
        data_type: to.clone(),
    })
}

/// Human name of a type as written in job files and SQL.
pub fn type_name(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 => "BIGINT",
        DataType::Float64 => "DOUBLE",
        DataType::Utf8 => "VARCHAR",
        DataType::Boolean => "BOOLEAN",
        DataType::Timestamp(..) => "TIMESTAMP",
        DataType::Null => "NULL",
        DataType::List(_) => "LIST",
        _ => "OTHER",
    }
}

/// Makes two operands comparable: numbers widen, literals adopt the other side's type.
fn unify(l: Expr, r: Expr, what: &str) -> Result<(Expr, Expr), ExprError> {
    let (lt, rt) = (l.data_type.clone(), r.data_type.clone());
    if lt == rt {
        return Ok((l, r));
    }
    if lt == DataType::Null {
        return Ok((coerce(l, &rt)?, r));
    }
    if rt == DataType::Null {
        return Ok((l, coerce(r, &lt)?));
    }
    if is_numeric(&lt) && is_numeric(&rt) {
        return Ok((
            coerce(l, &DataType::Float64)?,
            coerce(r, &DataType::Float64)?,
        ));
    }
    let l_lit = matches!(l.node, Node::Literal(_));
    let r_lit = matches!(r.node, Node::Literal(_));
    match (&lt, &rt) {
        (DataType::Timestamp(..), DataType::Utf8 | DataType::Int64) if r_lit => {
            return Ok((l, coerce(r, &lt)?));
        }
        (DataType::Utf8 | DataType::Int64, DataType::Timestamp(..)) if l_lit => {
            return Ok((coerce(l, &rt)?, r));
        }
        (DataType::Timestamp(..), DataType::Int64) => return Ok((coerce(l, &DataType::Int64)?, r)),
        (DataType::Int64, DataType::Timestamp(..)) => return Ok((l, coerce(r, &DataType::Int64)?)),
        _ => {}
    }
    err(format!(
        "cannot {what} {} and {}",
        type_name(&lt),
        type_name(&rt)
    ))
}

fn boolean_operand(e: Expr, ctx: &str) -> Result<Expr, ExprError> {
    match e.data_type {
        DataType::Boolean => Ok(e),
        DataType::Null => coerce(e, &DataType::Boolean),
        ref t => err(format!("{ctx} needs a BOOLEAN, got {}", type_name(t))),
    }
}

/// Compiles an expression that is only a column reference to that column as it is (dictionary
/// encoding and all), so projections pass columns through without converting them. Other
/// expressions compile as usual.
pub fn compile_passthrough(e: &sql::Expr, schema: &Schema) -> Result<Expr, ExprError> {
    let c = compile(e, schema)?;
    Ok(match &c.node {
        Node::Cast(inner)
            if matches!(
                e,
                sql::Expr::Identifier(_) | sql::Expr::CompoundIdentifier(_)
            ) =>
        {
            (**inner).clone()
        }
        _ => c,
    })
}

/// Compiles a parsed expression against `schema`.
pub fn compile(e: &sql::Expr, schema: &Schema) -> Result<Expr, ExprError> {
    use sql::Expr as E;
    Ok(match e {
        E::Identifier(i) => column(schema, &i.value)?,
        E::CompoundIdentifier(parts) => {
            let joined = parts
                .iter()
                .map(|p| p.value.as_str())
                .collect::<Vec<_>>()
                .join(".");
            column(schema, &joined)?
        }
        E::Value(v) => literal(&v.value)?,
        E::Nested(inner) => compile(inner, schema)?,
        E::BinaryOp { left, op, right } => {
            let (l, r) = (compile(left, schema)?, compile(right, schema)?);
            binary(l, op, r)?
        }
        E::UnaryOp { op, expr } => {
            let x = compile(expr, schema)?;
            match op {
                UnaryOperator::Not => Expr {
                    node: Node::Not(Box::new(boolean_operand(x, "NOT")?)),
                    data_type: DataType::Boolean,
                },
                UnaryOperator::Minus if is_numeric(&x.data_type) => {
                    let dt = x.data_type.clone();
                    Expr {
                        node: Node::Neg(Box::new(x)),
                        data_type: dt,
                    }
                }
                UnaryOperator::Plus if is_numeric(&x.data_type) => x,
                other => {
                    return err(format!(
                        "unary {other} is not supported on {}",
                        type_name(&x.data_type)
                    ));
                }
            }
        }
        E::IsNull(x) | E::IsNotNull(x) => Expr {
            node: Node::IsNull(Box::new(compile(x, schema)?), matches!(e, E::IsNotNull(_))),
            data_type: DataType::Boolean,
        },
        E::IsTrue(x) | E::IsFalse(x) => {
            let x = boolean_operand(compile(x, schema)?, "IS TRUE")?;
            let lit = Expr {
                node: Node::Literal(Arc::new(BooleanArray::from(vec![matches!(
                    e,
                    E::IsTrue(_)
                )]))),
                data_type: DataType::Boolean,
            };
            let eq = Expr {
                node: Node::Cmp(CmpOp::Eq, Box::new(x.clone()), Box::new(lit)),
                data_type: DataType::Boolean,
            };
            let not_null = Expr {
                node: Node::IsNull(Box::new(x), true),
                data_type: DataType::Boolean,
            };
            Expr {
                node: Node::And(Box::new(not_null), Box::new(eq)),
                data_type: DataType::Boolean,
            }
        }
        E::Cast {
            expr, data_type, ..
        } => {
            let to = sql_type(data_type)?;
            let x = compile(expr, schema)?;
            coerce(x, &to)?
        }
        E::InList {
            expr,
            list,
            negated,
        } => {
            let x = compile(expr, schema)?;
            let mut acc: Option<Expr> = None;
            for item in list {
                let eq = binary(x.clone(), &BinaryOperator::Eq, compile(item, schema)?)?;
                acc = Some(match acc {
                    None => eq,
                    Some(a) => Expr {
                        node: Node::Or(Box::new(a), Box::new(eq)),
                        data_type: DataType::Boolean,
                    },
                });
            }
            let Some(any) = acc else {
                return err("IN () needs at least one value");
            };
            if *negated {
                Expr {
                    node: Node::Not(Box::new(any)),
                    data_type: DataType::Boolean,
                }
            } else {
                any
            }
        }
        E::Between {
            expr,
            negated,
            low,
            high,
        } => {
            let x = compile(expr, schema)?;
            let ge = binary(x.clone(), &BinaryOperator::GtEq, compile(low, schema)?)?;
            let le = binary(x, &BinaryOperator::LtEq, compile(high, schema)?)?;
            let within = Expr {
                node: Node::And(Box::new(ge), Box::new(le)),
                data_type: DataType::Boolean,
            };
            if *negated {
                Expr {
                    node: Node::Not(Box::new(within)),
                    data_type: DataType::Boolean,
                }
            } else {
                within
            }
        }
        E::Like {
            negated,
            expr,
            pattern,
            escape_char: None,
            any: false,
        }
        | E::ILike {
            negated,
            expr,
            pattern,
            escape_char: None,
            any: false,
        } => {
            let x = coerce(compile(expr, schema)?, &DataType::Utf8)?;
            let p = coerce(compile(pattern, schema)?, &DataType::Utf8)?;
            Expr {
                node: Node::Like {
                    expr: Box::new(x),
                    pattern: Box::new(p),
                    negated: *negated,
                    insensitive: matches!(e, E::ILike { .. }),
                },
                data_type: DataType::Boolean,
            }
        }
        E::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            let operand = operand.as_ref().map(|o| compile(o, schema)).transpose()?;
            let mut whens = Vec::new();
            let mut ty: Option<DataType> = None;
            let mut results = Vec::new();
            for cw in conditions {
                let cond = match &operand {
                    Some(o) => binary(
                        o.clone(),
                        &BinaryOperator::Eq,
                        compile(&cw.condition, schema)?,
                    )?,
                    None => boolean_operand(compile(&cw.condition, schema)?, "WHEN")?,
                };
                let r = compile(&cw.result, schema)?;
                ty = Some(result_type(ty, &r.data_type)?);
                whens.push(cond);
                results.push(r);
            }
            let otherwise = else_result
                .as_ref()
                .map(|x| compile(x, schema))
                .transpose()?;
            if let Some(o) = &otherwise {
                ty = Some(result_type(ty, &o.data_type)?);
            }
            let ty = ty.unwrap_or(DataType::Null);
            let whens = whens
                .into_iter()
                .zip(results)
                .map(|(c, r)| Ok((c, coerce(r, &ty)?)))
                .collect::<Result<Vec<_>, ExprError>>()?;
            let otherwise = otherwise.map(|o| coerce(o, &ty)).transpose()?.map(Box::new);
            Expr {
                node: Node::Case(whens, otherwise),
                data_type: ty,
            }
        }
        E::Function(f) => function(f, schema)?,
        other => return err(format!("'{other}' is not supported in expressions")),
    })
}

fn result_type(acc: Option<DataType>, next: &DataType) -> Result<DataType, ExprError> {
    Ok(match acc {
        None => next.clone(),
        Some(a) if a == *next || *next == DataType::Null => a,
        Some(DataType::Null) => next.clone(),
        Some(a) if is_numeric(&a) && is_numeric(next) => DataType::Float64,
        Some(a) => {
            return err(format!(
                "CASE branches have different types: {} and {}",
                type_name(&a),
                type_name(next)
            ));
        }
    })
}

fn binary(l: Expr, op: &BinaryOperator, r: Expr) -> Result<Expr, ExprError> {
    use BinaryOperator as B;
    let arith = |a: Arith, l: Expr, r: Expr| -> Result<Expr, ExprError> {
        if !is_numeric(&l.data_type) && l.data_type != DataType::Null
            || !is_numeric(&r.data_type) && r.data_type != DataType::Null
        {
            return err(format!(
                "arithmetic needs numbers, got {} and {}",
                type_name(&l.data_type),
                type_name(&r.data_type)
            ));
        }
        let (l, r) = unify(l, r, "combine")?;
        let dt = l.data_type.clone();
        Ok(Expr {
            node: Node::Arith(a, Box::new(l), Box::new(r)),
            data_type: dt,
        })
    };
    let compare = |c: CmpOp, l: Expr, r: Expr| -> Result<Expr, ExprError> {
        let (l, r) = unify(l, r, "compare")?;
        Ok(Expr {
            node: Node::Cmp(c, Box::new(l), Box::new(r)),
            data_type: DataType::Boolean,
        })
    };
    Ok(match op {
        B::Plus => arith(Arith::Add, l, r)?,
        B::Minus => arith(Arith::Sub, l, r)?,
        B::Multiply => arith(Arith::Mul, l, r)?,
        B::Divide => arith(Arith::Div, l, r)?,
        B::Modulo => arith(Arith::Rem, l, r)?,
        B::Eq => compare(CmpOp::Eq, l, r)?,
        B::NotEq => compare(CmpOp::NotEq, l, r)?,
        B::Lt => compare(CmpOp::Lt, l, r)?,
        B::LtEq => compare(CmpOp::LtEq, l, r)?,
        B::Gt => compare(CmpOp::Gt, l, r)?,
        B::GtEq => compare(CmpOp::GtEq, l, r)?,
        B::And => Expr {
            node: Node::And(
                Box::new(boolean_operand(l, "AND")?),
                Box::new(boolean_operand(r, "AND")?),
            ),
            data_type: DataType::Boolean,
        },
        B::Or => Expr {
            node: Node::Or(
                Box::new(boolean_operand(l, "OR")?),
                Box::new(boolean_operand(r, "OR")?),
            ),
            data_type: DataType::Boolean,
        },
        B::StringConcat => {
            let l = coerce(l, &DataType::Utf8)?;
            let r = coerce(r, &DataType::Utf8)?;
            Expr {
                node: Node::Func(Func::ConcatOp, vec![l, r]),
                data_type: DataType::Utf8,
            }
        }
        other => return err(format!("operator {other} is not supported")),
    })
}

fn sql_type(t: &sql::DataType) -> Result<DataType, ExprError> {
    use sql::DataType as T;
    Ok(match t {
        T::BigInt(_) | T::Int(_) | T::Integer(_) | T::Int64 => DataType::Int64,
        T::Double(_) | T::Float(_) | T::Float64 | T::Real | T::DoublePrecision => DataType::Float64,
        T::Varchar(_) | T::Text | T::String(_) | T::Char(_) => DataType::Utf8,
        T::Boolean | T::Bool => DataType::Boolean,
        T::Timestamp(..) => timestamp_type(),
        other => {
            return err(format!(
                "CAST to {other} is not supported; use BIGINT, DOUBLE, VARCHAR, BOOLEAN or TIMESTAMP"
            ));
        }
    })
}

/// The name and plain arguments of a function call (for aggregates, parsed by their operator).
pub fn function_name(f: &sql::Function) -> String {
    f.name.to_string().to_lowercase()
}

/// The argument expressions of a call; `*` is returned as `None`.
pub fn function_args(f: &sql::Function) -> Result<(Vec<Option<sql::Expr>>, bool), ExprError> {
    match &f.args {
        FunctionArguments::None => Ok((Vec::new(), false)),
        FunctionArguments::List(list) => {
            let distinct = matches!(
                list.duplicate_treatment,
                Some(sql::DuplicateTreatment::Distinct)
            );
            let mut out = Vec::new();
            for a in &list.args {
                match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => out.push(Some(e.clone())),
                    FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => out.push(None),
                    other => return err(format!("argument '{other}' is not supported")),
                }
            }
            if !list.clauses.is_empty() {
                return err(format!(
                    "'{f}': clauses inside the argument list are not supported"
                ));
            }
            Ok((out, distinct))
        }
        FunctionArguments::Subquery(_) => err("subqueries are not supported"),
    }
}

/// Aggregate function names, rejected in scalar expressions with a pointer to windows.
pub const AGGREGATES: &[&str] = &["count", "sum", "min", "max", "avg", "top_n"];

fn function(f: &sql::Function, schema: &Schema) -> Result<Expr, ExprError> {
    let name = function_name(f);
    if AGGREGATES.contains(&name.as_str()) {
        return err(format!(
            "{name}() is an aggregate; use it in a window's aggregates"
        ));
    }
    if f.over.is_some() || f.filter.is_some() {
        return err(format!("{name}(): OVER and FILTER are not supported here"));
    }
    let (args, distinct) = function_args(f)?;
    if distinct {
        return err(format!("{name}(DISTINCT ...) is not supported"));
    }
    let args = args
        .into_iter()
        .map(|a| match a {
            Some(e) => compile(&e, schema),
            None => err(format!("{name}(*) is not supported")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let arity = |n: usize| -> Result<(), ExprError> {
        if args.len() != n {
            err(format!(
                "{name}() takes {n} argument(s), got {}",
                args.len()
            ))
        } else {
            Ok(())
        }
    };
    Ok(match name.as_str() {
        "lower" | "upper" => {
            arity(1)?;
            let a = coerce(args.into_iter().next().expect("arity"), &DataType::Utf8)?;
            Expr {
                node: Node::Func(
                    if name == "lower" {
                        Func::Lower
                    } else {
                        Func::Upper
                    },
                    vec![a],
                ),
                data_type: DataType::Utf8,
            }
        }
        "length" | "char_length" => {
            arity(1)?;
            let a = coerce(args.into_iter().next().expect("arity"), &DataType::Utf8)?;
            Expr {
                node: Node::Func(Func::Length, vec![a]),
                data_type: DataType::Int64,
            }
        }
        "abs" => {
            arity(1)?;
            let a = args.into_iter().next().expect("arity");
            if !is_numeric(&a.data_type) {
                return err(format!(
                    "abs() needs a number, got {}",
                    type_name(&a.data_type)
                ));
            }
            let dt = a.data_type.clone();
            Expr {
                node: Node::Func(Func::Abs, vec![a]),
                data_type: dt,
            }
        }
        "coalesce" => {
            if args.is_empty() {
                return err("coalesce() needs at least one argument");
            }
            let mut ty = None;
            for a in &args {
                ty = Some(result_type(ty, &a.data_type)?);
            }
            let ty = ty.expect("non-empty");
            let args = args
                .into_iter()
                .map(|a| coerce(a, &ty))
                .collect::<Result<Vec<_>, _>>()?;
            Expr {
                node: Node::Func(Func::Coalesce, args),
                data_type: ty,
            }
        }
        "concat" => Expr {
            node: Node::Func(Func::Concat, args),
            data_type: DataType::Utf8,
        },
        "epoch_ms" => {
            arity(1)?;
            let a = args.into_iter().next().expect("arity");
            if !matches!(a.data_type, DataType::Timestamp(..)) {
                return err(format!(
                    "epoch_ms() needs a TIMESTAMP, got {}",
                    type_name(&a.data_type)
                ));
            }
            coerce(a, &DataType::Int64)?
        }
        other => {
            return err(format!(
                "unknown function {other}(); available: lower, upper, length, abs, coalesce, concat, epoch_ms"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, TimestampMillisecondArray};
    use arrow::datatypes::Field;
    use arrow::datatypes::Int64Type;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("ts", timestamp_type(), true),
            Field::new("ok", DataType::Boolean, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), Some(-2), None])),
                Arc::new(Float64Array::from(vec![0.5, 1.5, 2.5])),
                Arc::new(StringArray::from(vec![Some("Ab"), Some("cd"), None])),
                Arc::new(TimestampMillisecondArray::from(vec![0, 60_000, 120_000])),
                Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
            ],
        )
        .unwrap()
    }

    fn eval(sql: &str) -> ArrayRef {
        let b = batch();
        Expr::compile(sql, &b.schema())
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .evaluate(&b)
            .unwrap()
    }

    fn bools(sql: &str) -> Vec<Option<bool>> {
        eval(sql).as_boolean().iter().collect()
    }

    #[test]
    fn arithmetic_widens_and_casts_truncate() {
        let v = eval("a * 2 + f");
        assert_eq!(v.data_type(), &DataType::Float64);
        let v = eval("CAST(f * 3 AS BIGINT)");
        assert_eq!(
            v.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(),
            vec![Some(1), Some(4), Some(7)]
        );
        assert_eq!(eval("a % 2").as_primitive::<Int64Type>().value(0), 1);
    }

    #[test]
    fn predicates_with_nulls_and_three_valued_logic() {
        assert_eq!(bools("a > 0"), vec![Some(true), Some(false), None]);
        assert_eq!(bools("a > 0 OR ok"), vec![Some(true), Some(false), None]);
        assert_eq!(bools("NOT ok"), vec![Some(false), Some(true), None]);
        assert_eq!(
            bools("s IS NULL"),
            vec![Some(false), Some(false), Some(true)]
        );
        assert_eq!(bools("a IN (1, 3)"), vec![Some(true), Some(false), None]);
        assert_eq!(
            bools("a BETWEEN -2 AND 0"),
            vec![Some(false), Some(true), None]
        );
        assert_eq!(bools("s LIKE 'A%'"), vec![Some(true), Some(false), None]);
        assert_eq!(
            bools("ts >= '1970-01-01T00:01:00Z'"),
            vec![Some(false), Some(true), Some(true)]
        );
        let b = batch();
        let p = Expr::compile("a > 0 OR ok", &b.schema())
            .unwrap()
            .evaluate_predicate(&b)
            .unwrap();
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![Some(true), Some(false), Some(false)]
        );
    }

    #[test]
    fn strings_case_and_functions() {
        let v = eval("lower(s) || '-' || CAST(a AS VARCHAR)");
        assert_eq!(v.as_string::<i32>().value(0), "ab-1");
        assert!(v.is_null(2));
        let v = eval("concat(s, a)");
        assert_eq!(
            v.as_string::<i32>().iter().collect::<Vec<_>>(),
            vec![Some("Ab1"), Some("cd-2"), Some("")]
        );
        let v = eval("CASE WHEN a > 0 THEN 'pos' WHEN a < 0 THEN 'neg' ELSE 'none' END");
        assert_eq!(
            v.as_string::<i32>().iter().collect::<Vec<_>>(),
            vec![Some("pos"), Some("neg"), Some("none")]
        );
        assert_eq!(eval("abs(a)").as_primitive::<Int64Type>().value(1), 2);
        assert_eq!(
            eval("coalesce(a, 0)").as_primitive::<Int64Type>().value(2),
            0
        );
        assert_eq!(
            eval("epoch_ms(ts)").as_primitive::<Int64Type>().value(1),
            60_000
        );
        assert_eq!(eval("length(s)").as_primitive::<Int64Type>().value(0), 2);
    }

    #[test]
    fn helpful_errors() {
        let s = batch().schema();
        let e = Expr::compile("usr_id = 1", &s).unwrap_err().message;
        assert!(
            e.contains("unknown column 'usr_id'") && e.contains("a, f, s"),
            "{e}"
        );
        let e = Expr::compile("s + 1", &s).unwrap_err().message;
        assert!(e.contains("arithmetic needs numbers"), "{e}");
        let e = Expr::compile("count(*)", &s).unwrap_err().message;
        assert!(e.contains("aggregate"), "{e}");
        let e = Expr::compile("a = = 1", &s).unwrap_err().message;
        assert!(e.contains("cannot parse"), "{e}");
        let e = Expr::compile("a 1", &s).unwrap_err().message;
        assert!(e.contains("unexpected"), "{e}");
        let e = Expr::compile("ts > 'yesterday'", &s).unwrap_err().message;
        assert!(e.contains("TIMESTAMP"), "{e}");
    }
}
