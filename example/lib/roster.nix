# The roster's machines repeated up to `count` machines, named as the test fleet names them
# (`python -m testbed up --machines N`, testbed/roster.py; tests/testbed checks the two agree):
# round r's copy of web1 is web<r*S+j+1>, S the number of roster machines named web<digits>
# and j web1's place among them in name order, so web1 web2 become web3 web4, db1 db2. A copy
# has its original's settings (class, roles, version, ...).
count: roster:
let
  names = builtins.attrNames roster; # in name order
  stem = name:
    let cut = builtins.head (builtins.match "(.*[^0-9]|)[0-9]*" name); in
    if cut == "" then name else cut;
  place = name: list:
    builtins.length (builtins.filter (other: other < name) list);
  rounds = (count + builtins.length names - 1) / builtins.length names;
  copy = round: name:
    let same = builtins.filter (other: stem other == stem name) names; in {
      name =
        if round == 0 then name
        else "${stem name}${toString (round * builtins.length same + place name same + 1)}";
      value = roster.${name};
    };
in
builtins.listToAttrs (builtins.concatLists (builtins.genList (round: map (copy round) names) rounds))
